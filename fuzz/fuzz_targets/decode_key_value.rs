//! `key=value` lines: readings name keys that are in the line, all with the line's time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate_fuzz::{NOW, check_decoded, check_one_time_per_line, decoder};

fuzz_target!(|data: &[u8]| {
    let Some((&options, payload)) = data.split_first() else {
        return;
    };
    let timestamp_field = if options & 1 == 0 { None } else { Some("ts") };
    let fields: &[&str] = match (options >> 1) & 3 {
        0 => &[],
        1 => &["temp"],
        _ => &["temp", "hum"],
    };
    let decoder = decoder(
        PayloadFormat::KeyValue,
        timestamp_field,
        fields,
        &[],
        None,
        None,
    );
    let decoded = decoder.decode(payload, NOW);
    check_decoded(&decoder, payload, &decoded);
    check_one_time_per_line(&decoded);
    if let Ok(readings) = &decoded {
        let line = String::from_utf8_lossy(payload);
        for reading in readings {
            assert!(
                line.contains(&format!("{}=", reading.field))
                    || line.contains(&format!("{}:", reading.field)),
                "`{}` is not a key in the line",
                reading.field
            );
        }
    }
});
