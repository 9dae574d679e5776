//! RFC 3339 timestamps to and from [`Millis`], and a device's local times read in its
//! time zone.

use jiff::fmt::temporal::Pieces;
use jiff::tz::TimeZone;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::reading::Millis;

/// Parses `2026-11-25T10:00:00Z` or `2026-11-25T11:00:00.250+01:00`.
pub fn parse_rfc3339(text: &str) -> Option<Millis> {
    let at = OffsetDateTime::parse(text, &Rfc3339).ok()?;
    Some((at.unix_timestamp_nanos() / 1_000_000) as Millis)
}

/// How a device's source times written as text are read: with an offset (RFC 3339)
/// always; as a local date and time (`2026-11-24T10:00:00`, Tasmota's default) only in the
/// device's `timezone`, which says which offset such a time had.
#[derive(Clone, Debug, Default)]
pub struct TimeText {
    pub zone: Option<TimeZone>,
}

impl TimeText {
    /// The time `text` names, or `None` when it is no time or a local time with no zone to
    /// read it in ([`TimeText::hint`] tells which).
    pub fn parse(&self, text: &str) -> Option<Millis> {
        if let Some(at) = parse_rfc3339(text) {
            return Some(at);
        }
        let zone = self.zone.as_ref()?;
        let local = local_date_time(text)?;
        // In a shift back the earlier of the two instants, in a gap the later: the
        // "compatible" rule of RFC 5545 and of JavaScript's Temporal.
        let at = zone.to_ambiguous_timestamp(local).compatible().ok()?;
        Some(at.as_millisecond())
    }

    /// What to add to "expected ... RFC 3339" when `text` could not be read.
    pub fn hint(&self, text: &str) -> &'static str {
        if self.zone.is_none() && local_date_time(text).is_some() {
            "; it is a local time without an offset: set the device's `timezone` \
             (an IANA name such as \"Europe/Berlin\") to read it"
        } else {
            ""
        }
    }
}

/// The time zone an IANA name (`Europe/Berlin`, `UTC`) names, from the system's tz database
/// or the copy built in.
///
/// # Errors
/// A sentence naming the zone when the database does not know it.
pub fn time_zone(name: &str) -> Result<TimeZone, String> {
    TimeZone::get(name).map_err(|_| {
        format!(
            "timezone `{name}` is not in the tz database; use an IANA name such as \"Europe/Berlin\" or \"UTC\""
        )
    })
}

/// A date and time of day with neither offset nor zone: `2026-11-24T10:00:00`, with a
/// fraction or a space for the `T`.
fn local_date_time(text: &str) -> Option<jiff::civil::DateTime> {
    let pieces = Pieces::parse(text).ok()?;
    if pieces.offset().is_some() || pieces.time_zone_annotation().is_some() {
        return None;
    }
    Some(pieces.date().to_datetime(pieces.time()?))
}

/// Formats as RFC 3339 in UTC with milliseconds.
pub fn format_rfc3339(millis: Millis) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000)
        .ok()
        .and_then(|at| at.format(&Rfc3339).ok())
        .unwrap_or_else(|| millis.to_string())
}

/// Writes `millis` as RFC 3339 in UTC, like [`format_rfc3339`] but without allocating:
/// `2023-11-14T22:13:20.25Z` (trailing zeros of the fraction dropped, no fraction when it is
/// zero). Times before year 0 or after 9999 fall back to the number.
pub fn write_rfc3339(out: &mut String, millis: Millis) {
    const MAX: Millis = 253_402_300_799_999; // 9999-12-31T23:59:59.999Z
    if !(0..=MAX).contains(&millis) {
        out.push_str(&format_rfc3339(millis));
        return;
    }
    let days = millis.div_euclid(86_400_000);
    let in_day = millis.rem_euclid(86_400_000);
    let (year, month, day) = civil_from_days(days);
    let (h, m, s, ms) = (
        in_day / 3_600_000,
        in_day / 60_000 % 60,
        in_day / 1000 % 60,
        in_day % 1000,
    );
    let two = |out: &mut String, n: Millis| {
        out.push(char::from(b'0' + (n / 10) as u8));
        out.push(char::from(b'0' + (n % 10) as u8));
    };
    two(out, year / 100);
    two(out, year % 100);
    out.push('-');
    two(out, month);
    out.push('-');
    two(out, day);
    out.push('T');
    two(out, h);
    out.push(':');
    two(out, m);
    out.push(':');
    two(out, s);
    if ms > 0 {
        out.push('.');
        let digits = [ms / 100, ms / 10 % 10, ms % 10];
        let len = if ms % 100 == 0 {
            1
        } else if ms % 10 == 0 {
            2
        } else {
            3
        };
        for d in &digits[..len] {
            out.push(char::from(b'0' + *d as u8));
        }
    }
    out.push('Z');
}

/// Year, month and day of a day count from 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: Millis) -> (Millis, Millis, Millis) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + Millis::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_formatter_writes_what_the_time_crate_writes() {
        let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
        let mut times = vec![
            0,
            1,
            999,
            1000,
            1_700_000_000_250,
            1_700_000_000_200,
            951_782_400_000,
            253_402_300_799_999,
        ];
        for _ in 0..20_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            times.push((seed % 253_402_300_800_000) as Millis);
        }
        for t in times {
            let mut fast = String::new();
            write_rfc3339(&mut fast, t);
            assert_eq!(fast, format_rfc3339(t), "{t}");
        }
    }

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

    #[test]
    fn local_times_are_read_in_the_device_zone_or_not_at_all() {
        let berlin = TimeText {
            zone: Some(TimeZone::get("Europe/Berlin").unwrap()),
        };
        // 10:00 in Berlin is 09:00 UTC in winter, 08:00 in summer.
        assert_eq!(
            berlin.parse("2026-11-24T10:00:00"),
            parse_rfc3339("2026-11-24T09:00:00Z")
        );
        assert_eq!(
            berlin.parse("2026-07-01 10:00:00.250"),
            parse_rfc3339("2026-07-01T08:00:00.250Z")
        );
        // In the hour that repeats when clocks go back, the first; in the hour skipped
        // when they go forward, the instant after the gap.
        assert_eq!(
            berlin.parse("2026-10-25T02:30:00"),
            parse_rfc3339("2026-10-25T00:30:00Z")
        );
        assert_eq!(
            berlin.parse("2026-03-29T02:30:00"),
            parse_rfc3339("2026-03-29T01:30:00Z")
        );
        // An offset wins over the zone.
        assert_eq!(
            berlin.parse("2026-11-24T10:00:00Z"),
            parse_rfc3339("2026-11-24T10:00:00Z")
        );
        assert_eq!(berlin.parse("2026-11-24"), None, "a date is no time");
        assert_eq!(berlin.parse("soon"), None);
        assert_eq!(berlin.hint("2026-11-24T10:00:00"), "");

        let unzoned = TimeText::default();
        assert_eq!(unzoned.parse("2026-11-24T10:00:00"), None);
        assert!(unzoned.hint("2026-11-24T10:00:00").contains("`timezone`"));
        assert_eq!(unzoned.hint("soon"), "");
    }
}
