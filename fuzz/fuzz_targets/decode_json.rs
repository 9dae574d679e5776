//! MQTT JSON payloads: any bytes decode to readings or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate_fuzz::{NOW, check_decoded, decoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the device's options, the rest is the payload.
    let Some((&options, payload)) = data.split_first() else {
        return;
    };
    // As in the golden cases (src/decode/testcases/json_*), which are the seeds.
    let timestamp_field = match options & 3 {
        0 => None,
        1 => Some("ts"),
        2 => Some("meta.at"),
        _ => Some("time"),
    };
    let fields: &[&str] = match (options >> 2) & 3 {
        0 => &[],
        1 => &["t"],
        2 => &["temp", "hum"],
        _ => &["env.temp", "t", "h"],
    };
    let decoder = decoder(
        PayloadFormat::Json,
        timestamp_field,
        fields,
        &[],
        None,
        None,
    );
    let decoded = decoder.decode(payload, NOW);
    check_decoded(&decoder, payload, &decoded);
    if let Ok(readings) = &decoded {
        // Epoch numbers are refused below zero; only RFC 3339 reaches before 1970, and
        // the time crate stops at year -9999.
        for reading in readings {
            if let Some(t) = reading.source_time {
                assert!(t >= -377_705_116_800_000, "{t}");
            }
        }
    }
});
