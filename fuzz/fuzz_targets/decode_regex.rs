//! Regex lines: readings come only from the pattern's named captures, all with the line's
//! time. The pattern is one of the golden cases' (the seeds) or, when it compiles, fuzzed
//! too.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate::decode::{Decoder, Layout};
use sensorgate_fuzz::{NOW, check_decoded, check_one_time_per_line, decoder};

const PATTERNS: [&str; 4] = [
    r"T:(?P<temp>[-+0-9.]+)C H:(?P<hum>[0-9.]+)% @(?P<ts>\d+)",
    r"T:(?P<temp>[-+0-9.]+)(?: H:(?P<hum>[0-9.]+))?",
    r"^(?P<ts>\S+)\s+(?P<temp>\S+)(?:\s+(?P<hum>\S+))?",
    r"(?P<v>.*)",
];

/// A device's decoder: the timestamp field is `ts` when the pattern names it, and with
/// `configured` the one field is `temp`.
fn device(pattern: &str, configured: bool) -> Decoder {
    let timestamp_field = pattern.contains("?P<ts>").then_some("ts");
    let fields: &[&str] = if configured && pattern.contains("?P<temp>") {
        &["temp"]
    } else {
        &[]
    };
    decoder(
        PayloadFormat::Regex,
        timestamp_field,
        fields,
        &[],
        None,
        Some(pattern),
    )
}

/// Compiled once: compiling a pattern costs far more than matching a line.
static DEVICES: LazyLock<Vec<Decoder>> = LazyLock::new(|| {
    PATTERNS
        .iter()
        .flat_map(|p| [device(p, false), device(p, true)])
        .collect()
});

fuzz_target!(|data: &[u8]| {
    let Some((&options, rest)) = data.split_first() else {
        return;
    };
    // Option bit 7: the pattern is fuzzed too, up to the first NUL byte.
    let fuzzed;
    let (decoder, line) = if options & 0x80 != 0 {
        let Some(at) = rest.iter().position(|b| *b == 0) else {
            return;
        };
        let Ok(pattern) = std::str::from_utf8(&rest[..at]) else {
            return;
        };
        // As the config check: it must compile (within the default size limit) and name a
        // capture.
        match regex::Regex::new(pattern) {
            Ok(re) if re.capture_names().flatten().next().is_some() => {}
            _ => return,
        }
        fuzzed = device(pattern, options & 1 != 0);
        (&fuzzed, &rest[at + 1..])
    } else {
        (&DEVICES[usize::from(options & 7)], rest)
    };
    let decoded = decoder.decode(line, NOW);
    check_decoded(decoder, line, &decoded);
    check_one_time_per_line(&decoded);
    if let (Ok(readings), Layout::Regex(pattern, _)) = (&decoded, &decoder.layout) {
        let names: Vec<&str> = pattern.capture_names().flatten().collect();
        for reading in readings {
            assert!(
                names.contains(&&*reading.field),
                "`{}` is not a named capture of `{pattern}`",
                reading.field
            );
        }
    }
});
