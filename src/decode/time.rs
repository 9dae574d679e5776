//! RFC 3339 timestamps to and from [`Millis`].

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::reading::Millis;

/// Parses `2026-11-25T10:00:00Z` or `2026-11-25T11:00:00.250+01:00`.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some((at.unix_timestamp_nanos() / 1_000_000) as Millis)
}

/// Formats as RFC 3339 in UTC with milliseconds.
pub fn format_rfc3339(millis: Millis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| millis.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_utc_millis() {
        let ms = parse_rfc3339("2023-11-14T22:13:20.250Z").unwrap();
        assert_eq!(ms, 1_700_000_000_250);
        assert_eq!(format_rfc3339(ms), "2023-11-14T22:13:20.25Z");
    }

    #[test]
    fn honours_offsets() {
        assert_eq!(
            parse_rfc3339("2023-11-14T23:13:20+01:00"),
            Some(1_700_000_000_000)
        );
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
