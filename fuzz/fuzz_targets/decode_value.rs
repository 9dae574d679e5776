//! Plain values: a number as text is one reading, anything else an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate_fuzz::{NOW, check_decoded, decoder};

fuzz_target!(|data: &[u8]| {
    let Some((&options, payload)) = data.split_first() else {
        return;
    };
    let fields: &[&str] = if options & 1 == 0 { &[] } else { &["power"] };
    let decoder = decoder(PayloadFormat::Value, None, fields, &[], None, None);
    let decoded = decoder.decode(payload, NOW);
    check_decoded(&decoder, payload, &decoded);
    if let Ok(readings) = &decoded {
        assert_eq!(readings.len(), 1, "{readings:?}");
        let name = fields.first().copied().unwrap_or("value");
        assert_eq!(&*readings[0].field, name);
        assert_eq!(readings[0].source_time, None);
    }
});
