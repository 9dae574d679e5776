//! Parsing what a person or a program passes to a query: times, durations, limits. Shared by
//! the CLI flags and the HTTP API's query parameters, so both accept the same spellings.

use std::time::Duration;

use crate::decode::parse_rfc3339;
use crate::reading::Millis;

/// `2026-11-25T10:00:00Z` (RFC 3339) or epoch milliseconds.
pub fn time(text: &str) -> Option<Millis> {
    let text = text.trim();
    parse_rfc3339(text).or_else(|| text.parse::<Millis>().ok())
}

/// `15m`, `1h`, `7d`.
pub fn duration(text: &str) -> Option<Duration> {
    humantime::parse_duration(text.trim()).ok()
}

/// A rollup window width in milliseconds: a whole number of seconds, at least one.
pub fn window(text: &str) -> Option<Millis> {
    let width = duration(text)?;
    (width.as_millis() >= 1000 && width.subsec_millis() == 0).then_some(width.as_millis() as Millis)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_or_epoch_millis() {
        assert_eq!(time("2023-11-14T22:13:20Z"), Some(1_700_000_000_000));
        assert_eq!(time(" 1700000000000 "), Some(1_700_000_000_000));
        assert_eq!(time("yesterday"), None);
    }

    #[test]
    fn windows_are_whole_seconds() {
        assert_eq!(window("1m"), Some(60_000));
        assert_eq!(window("500ms"), None);
        assert_eq!(window("1m 500ms"), None);
        assert_eq!(window("soon"), None);
    }
}
