//! The validator's rules, one message at a time.

use super::*;
use crate::reading::DecodeError;

const NOW: Millis = 1_700_000_000_000;

fn validator(extra: &str) -> Validator {
    let text = format!(
        r#"
        [validation]
        {extra}
        [[brokers]]
        url = "mqtt://localhost"
        [[devices]]
        kind = "mqtt"
        id = "bay3"
        topic = "bay3"
        format = "json"
        [[devices.metrics]]
        name = "humidity"
        field = "hum"
        unit = "%"
        min = 0
        max = 100
        "#
    );
    Validator::new(
        &crate::config::parse(&text, "t.toml".as_ref()).unwrap(),
        &[],
    )
}

fn message(readings: Vec<RawReading>) -> Message {
    Message {
        device: DeviceId::new("bay3"),
        source: Arc::from("bay3"),
        received_at: NOW,
        raw: crate::reading::Bytes::from_static(b"{}"),
        decoded: Ok(readings.into()),
        ticket: None,
    }
}

fn raw(field: &str, value: f64, time: Option<Millis>) -> RawReading {
    RawReading {
        field: field.into(),
        value,
        unit: None,
        source_time: time,
    }
}

#[test]
fn maps_fields_to_metric_names_and_units() {
    let out = validator("").check(&message(vec![raw("hum", 40.0, Some(NOW - 10))]));
    assert_eq!(out.rejection, None);
    let r = &out.readings[0];
    assert_eq!(
        (r.series.metric(), r.series.unit(), r.value, r.time),
        ("humidity", Some("%"), 40.0, NOW - 10)
    );
    assert_eq!(r.flags, ReadingFlags(0));
}

#[test]
fn rejects_humidity_above_100_percent() {
    let out = validator("").check(&message(vec![raw("hum", 101.0, None)]));
    assert!(out.readings.is_empty());
    let rejection = out.rejection.unwrap();
    assert_eq!(rejection.reason, RejectReason::OutOfRange);
    assert_eq!(rejection.detail, "humidity = 101 is above max 100");
    assert_eq!(&*rejection.raw, b"{}");
    assert_eq!((rejection.values, rejection.size), (1, 2));
}

#[test]
fn rejects_nan_and_infinity() {
    let out = validator("").check(&message(vec![
        raw("hum", f64::NAN, None),
        raw("x", f64::INFINITY, None),
    ]));
    let rejection = out.rejection.unwrap();
    assert_eq!(rejection.values, 2);
    assert_eq!(rejection.reason, RejectReason::NotFinite);
    assert!(
        rejection
            .detail
            .starts_with("2 of 2 values not stored (not_finite 2): humidity = NaN"),
        "{}",
        rejection.detail
    );
}

#[test]
fn keeps_the_good_values_of_a_message_with_a_bad_one() {
    let out = validator("").check(&message(vec![
        raw("hum", 50.0, None),
        raw("hum2", f64::NAN, None),
    ]));
    assert_eq!(out.readings.len(), 1);
    assert_eq!(out.rejection.unwrap().values, 1);
}

/// However many values a message has refused, it costs one rejection holding its raw
/// bytes once, and a detail of bounded length.
#[test]
fn a_message_of_many_refused_values_is_one_rejection() {
    let mut v = validator("");
    let mut msg = message(
        (0..2000)
            .map(|i| raw("hum", 1000.0 + f64::from(i), None))
            .chain([raw("hum", f64::NAN, None), raw("hum", 50.0, None)])
            .collect(),
    );
    msg.raw = crate::reading::Bytes::from(vec![b'x'; 32_000]);
    let out = v.check(&msg);
    assert_eq!(out.readings.len(), 1);
    let rejection = out.rejection.unwrap();
    assert_eq!(rejection.reason, RejectReason::OutOfRange);
    assert_eq!(rejection.values, 2001);
    assert_eq!(rejection.raw.len(), 32_000);
    assert!(rejection.detail.len() < 1024, "{}", rejection.detail);
    assert!(
        rejection.detail.starts_with(
            "2001 of 2002 values not stored (out_of_range 2000, not_finite 1): \
             humidity = 1000 is above max 100; humidity = 1001"
        ),
        "{}",
        rejection.detail
    );
    assert!(
        rejection.detail.ends_with("; and 1993 more"),
        "{}",
        rejection.detail
    );
}

#[test]
fn stores_malformed_payloads_as_rejections() {
    let mut msg = message(vec![]);
    msg.decoded = Err(DecodeError::malformed("invalid JSON: eof"));
    let out = validator("").check(&msg);
    let rejection = out.rejection.unwrap();
    assert_eq!(rejection.reason, RejectReason::Malformed);
    assert_eq!(rejection.detail, "invalid JSON: eof");
}

#[test]
fn unknown_metrics_follow_the_policy() {
    let stored =
        validator("unknown_metrics = \"store\"").check(&message(vec![raw("co2", 400.0, None)]));
    assert_eq!(stored.readings[0].series.metric(), "co2");
    let rejected =
        validator("unknown_metrics = \"reject\"").check(&message(vec![raw("co2", 400.0, None)]));
    assert_eq!(
        rejected.rejection.unwrap().reason,
        RejectReason::UnknownMetric
    );
}

#[test]
fn caps_the_metrics_a_device_may_add_beyond_its_config() {
    let mut v = validator("max_metrics_per_device = 2");
    let out = v.check(&message(vec![
        raw("a", 1.0, None),
        raw("b", 1.0, None),
        raw("a", 2.0, None),
        raw("c", 1.0, None),
        raw("hum", 1.0, None),
    ]));
    let names: Vec<&str> = out.readings.iter().map(|r| r.series.metric()).collect();
    assert_eq!(names, vec!["a", "b", "a", "humidity"]);
    let rejection = out.rejection.unwrap();
    assert_eq!(rejection.reason, RejectReason::TooManyMetrics);
    assert!(
        rejection.detail.contains("max_metrics_per_device"),
        "{}",
        rejection.detail
    );
}

/// The cap counts the metrics beyond the config that the database already holds, so a
/// crash loop cannot add another batch of series with every start.
#[test]
fn the_metric_cap_counts_what_earlier_runs_stored() {
    let text = r#"
        [validation]
        max_metrics_per_device = 2
        [[brokers]]
        url = "mqtt://localhost"
        [[devices]]
        kind = "mqtt"
        id = "bay3"
        topic = "bay3"
        format = "json"
        [[devices.metrics]]
        name = "humidity"
        field = "hum"
        "#;
    let config = crate::config::parse(text, "t.toml".as_ref()).unwrap();
    let stored = [
        ("bay3".to_string(), "humidity".to_string()),
        ("bay3".to_string(), "a".to_string()),
        ("bay3".to_string(), "b".to_string()),
        ("other".to_string(), "c".to_string()),
    ];
    let mut v = Validator::new(&config, &stored);
    let out = v.check(&message(vec![
        raw("a", 1.0, None),
        raw("b", 1.0, None),
        raw("c", 1.0, None),
        raw("hum", 1.0, None),
    ]));
    let names: Vec<&str> = out.readings.iter().map(|r| r.series.metric()).collect();
    assert_eq!(names, vec!["a", "b", "humidity"]);
    assert_eq!(out.rejection.unwrap().reason, RejectReason::TooManyMetrics);

    // A device a reload adds finds what the database holds of it.
    let added = format!(
        "{text}\n[[devices]]\nkind = \"mqtt\"\nid = \"other\"\ntopic = \"o\"\nformat = \"json\"\n"
    )
    .replace("max_metrics_per_device = 2", "max_metrics_per_device = 1");
    v.reconfigure(&crate::config::parse(&added, "t.toml".as_ref()).unwrap());
    let mut other = message(vec![raw("c", 1.0, None), raw("d", 1.0, None)]);
    other.device = DeviceId::new("other");
    let out = v.check(&other);
    let names: Vec<&str> = out.readings.iter().map(|r| r.series.metric()).collect();
    assert_eq!(names, vec!["c"]);
    assert_eq!(out.rejection.unwrap().reason, RejectReason::TooManyMetrics);
}

#[test]
fn flags_skew_and_rejects_far_future_or_past() {
    let mut v = validator("max_skew = \"5s\"\nmax_future = \"1m\"\nmax_past = \"1h\"");
    let out = v.check(&message(vec![
        raw("hum", 1.0, Some(NOW + 10_000)),
        raw("hum", 2.0, Some(NOW + 61_000)),
        raw("hum", 3.0, Some(NOW - 3_601_000)),
        raw("hum", 4.0, Some(NOW - 4_000)),
    ]));
    assert_eq!(out.readings.len(), 2);
    assert!(out.readings[0].flags.has(ReadingFlags::SKEWED));
    assert!(!out.readings[1].flags.has(ReadingFlags::SKEWED));
    let rejection = out.rejection.unwrap();
    assert_eq!(rejection.reason, RejectReason::BadTimestamp);
    assert_eq!(rejection.values, 2);
    assert!(
        rejection.detail.contains("ahead of the gateway clock")
            && rejection.detail.contains("older than max_past"),
        "{}",
        rejection.detail
    );
}

#[test]
fn a_reload_keeps_series_keys_and_applies_new_limits() {
    let mut v = validator("");
    let before = v.check(&message(vec![raw("hum", 50.0, None)]));
    let key = before.readings[0].series.key();
    let text = r#"
        [[brokers]]
        url = "mqtt://localhost"
        [[devices]]
        kind = "mqtt"
        id = "bay3"
        topic = "bay3"
        format = "json"
        [[devices.metrics]]
        name = "humidity"
        field = "hum"
        unit = "%"
        min = 0
        max = 40
        [[devices]]
        kind = "mqtt"
        id = "bay4"
        topic = "bay4"
        format = "json"
        "#;
    v.reconfigure(&crate::config::parse(text, "t.toml".as_ref()).unwrap());
    let after = v.check(&message(vec![
        raw("hum", 30.0, None),
        raw("hum", 50.0, None),
    ]));
    assert_eq!(
        after.readings[0].series.key(),
        key,
        "an unchanged metric keeps its series"
    );
    assert_eq!(
        after.rejection.unwrap().reason,
        RejectReason::OutOfRange,
        "the new max applies"
    );
    let mut added = message(vec![raw("t", 1.0, None)]);
    added.device = DeviceId::new("bay4");
    assert_eq!(
        v.check(&added).readings.len(),
        1,
        "an added device is known"
    );
}

#[test]
fn readings_without_source_time_get_distinct_receive_stamps() {
    let mut v = validator("");
    let first = v.check(&message(vec![raw("hum", 1.0, None), raw("hum", 2.0, None)]));
    let second = v.check(&message(vec![raw("hum", 3.0, None)]));
    let times: Vec<_> = first
        .readings
        .iter()
        .chain(&second.readings)
        .map(|r| r.time)
        .collect();
    assert_eq!(times, vec![NOW, NOW + 1, NOW + 2]);
    assert!(first.readings[0].flags.has(ReadingFlags::RECEIVE_TIME));
}

/// Lines in one millisecond once got 1 ms per metric separately, so one line's humidity
/// could land on another line's time.
#[test]
fn the_readings_of_one_line_share_one_time_and_the_next_line_comes_after() {
    let mut v = validator("");
    let lines = [
        vec![raw("t", 1.0, None), raw("hum", 35.1, None)],
        vec![raw("hum", 35.2, None)],
        vec![raw("t", 3.0, None), raw("hum", 35.5, None)],
    ];
    let times: Vec<Vec<(String, Millis)>> = lines
        .into_iter()
        .map(|line| {
            v.check(&message(line))
                .readings
                .iter()
                .map(|r| (r.series.metric().to_string(), r.time))
                .collect()
        })
        .collect();
    assert_eq!(
        times,
        vec![
            vec![("t".into(), NOW), ("humidity".into(), NOW)],
            vec![("humidity".into(), NOW + 1)],
            vec![("t".into(), NOW + 2), ("humidity".into(), NOW + 2)],
        ]
    );
    let mut later = message(vec![raw("t", 4.0, None)]);
    later.received_at = NOW + 1_000;
    assert_eq!(v.check(&later).readings[0].time, NOW + 1_000);
}

/// RFC 8428's pack of several data types: its numbers are stored, its strings counted.
#[test]
fn values_that_are_not_numbers_are_counted_beside_the_readings_stored() {
    let mut v = validator("");
    let mut skipped = Skipped::default();
    for name in ["label", "nfc-reader"] {
        skipped.add(|| format!("record (`{name}`) has a string or data value"));
    }
    let mut msg = message(Vec::new());
    msg.decoded = Ok(crate::reading::Decoding {
        readings: vec![raw("hum", 40.0, Some(NOW))],
        skipped,
    });
    let checked = v.check(&msg);
    assert_eq!(checked.readings.len(), 1);
    let rejection = checked.rejection.unwrap();
    assert_eq!(rejection.reason, RejectReason::NotNumeric);
    assert_eq!(rejection.values, 2);
    assert!(
        rejection
            .detail
            .starts_with("2 of 3 values not stored (not_numeric 2)"),
        "{}",
        rejection.detail
    );
    assert!(
        rejection.detail.contains("`nfc-reader`"),
        "{}",
        rejection.detail
    );
}
