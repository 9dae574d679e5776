//! RFC 3339 timestamps: whatever parses formats back to the same instant, and the fast
//! formatter writes what the time crate writes, for any millisecond count.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::decode::{format_rfc3339, parse_rfc3339, write_rfc3339};

fuzz_target!(|data: &[u8]| {
    if let Some(bytes) = data.get(..8) {
        let millis = i64::from_le_bytes(bytes.try_into().unwrap());
        let mut fast = String::new();
        write_rfc3339(&mut fast, millis);
        assert_eq!(fast, format_rfc3339(millis), "{millis}");
        if (0..=253_402_300_799_999).contains(&millis) {
            assert_eq!(parse_rfc3339(&fast), Some(millis), "{fast}");
        }
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Some(millis) = parse_rfc3339(text) {
        let formatted = format_rfc3339(millis);
        // Years beyond four digits fall back to the number, which is no RFC 3339.
        if formatted.contains('T') {
            assert_eq!(
                parse_rfc3339(&formatted),
                Some(millis),
                "{text} -> {formatted}"
            );
        }
    }
});
