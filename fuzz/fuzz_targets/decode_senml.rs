//! SenML packs (RFC 8428): any bytes decode to readings or an error, never a panic; times
//! are either near the receive time (relative) or a plausible absolute time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate_fuzz::{NOW, SENML_RELATIVE_MS, check_decoded, decoder};

fuzz_target!(|data: &[u8]| {
    let Some((&options, payload)) = data.split_first() else {
        return;
    };
    // As in the golden cases (src/decode/testcases/senml_*), which are the seeds.
    let fields: &[&str] = match options & 3 {
        0 => &[],
        1 => &["b"],
        2 => &["urn:dev:ow:10e2073a01080063:temp", "t"],
        _ => &["state", "x"],
    };
    let decoder = decoder(PayloadFormat::Senml, None, fields, &[], None, None);
    let decoded = decoder.decode(payload, NOW);
    check_decoded(&decoder, payload, &decoded);
    if let Ok(readings) = &decoded {
        for reading in readings {
            let Some(t) = reading.source_time else {
                continue;
            };
            let relative = (NOW - SENML_RELATIVE_MS..=NOW + SENML_RELATIVE_MS).contains(&t);
            let absolute = (0..10_000_000_000_000_000).contains(&t);
            assert!(
                relative || absolute,
                "time {t} is neither relative nor absolute"
            );
        }
    }
});
