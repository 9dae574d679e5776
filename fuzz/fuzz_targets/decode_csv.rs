//! CSV lines: readings come only from named columns (not `_`, not the timestamp), all with
//! the line's time.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate_fuzz::{NOW, check_decoded, check_one_time_per_line, decoder};

/// Devices as in the golden cases (src/decode/testcases/csv_*), which are the seeds:
/// columns, timestamp field, configured fields.
type Device = (
    &'static [&'static str],
    Option<&'static str>,
    &'static [&'static str],
);
const DEVICES: [Device; 4] = [
    (&["ts", "temp", "hum"], Some("ts"), &[]),
    (&["temp", "hum"], None, &["hum"]),
    (&["_", "temp", ""], None, &[]),
    (&["ts", "v", "_", "w", "x"], Some("ts"), &["v", "x"]),
];
const DELIMITERS: [char; 8] = [',', ';', '\t', ' ', '|', '§', ',', ','];

fuzz_target!(|data: &[u8]| {
    let Some((&options, payload)) = data.split_first() else {
        return;
    };
    let (columns, timestamp_field, fields) = DEVICES[usize::from(options & 3)];
    let fields = if options & 4 == 0 { &[] } else { fields };
    let delimiter = DELIMITERS[usize::from(options >> 3) & 7];
    let decoder = decoder(
        PayloadFormat::Csv,
        timestamp_field,
        fields,
        columns,
        Some(delimiter),
        None,
    );
    let decoded = decoder.decode(payload, NOW);
    check_decoded(&decoder, payload, &decoded);
    check_one_time_per_line(&decoded);
    if let Ok(readings) = &decoded {
        for reading in readings {
            let field = &*reading.field;
            assert!(
                columns.contains(&field) && field != "_" && Some(field) != timestamp_field,
                "`{field}` is not a value column of {columns:?}"
            );
        }
    }
});
