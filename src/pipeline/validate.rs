//! Validation: decoded values become [`Reading`]s or [`Rejection`]s. A pure state machine;
//! besides the interned series, its state is the receive-time clock per device and series,
//! which keeps readings without a source time from colliding on the same millisecond.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{Config, UnknownMetrics, ValidationConfig};
use crate::decode::format_rfc3339;
use crate::reading::{
    DeviceId, FastMap, FastSet, Message, Millis, RawReading, Reading, ReadingFlags, RejectReason,
    Rejection, Series, SeriesInfo, SeriesKey, Skipped,
};

/// Why one value was not stored, and the sentence that says so.
type Invalid = (RejectReason, String);
/// A metric's configured min and max.
type Limits = (Option<f64>, Option<f64>);

/// What one message became: readings, and at most one rejection for whatever of it was
/// not stored.
#[derive(Debug, Default, PartialEq)]
pub struct Checked {
    pub readings: Vec<Reading>,
    pub rejection: Option<Rejection>,
}

/// The most refused values a rejection's detail names one by one; the rest are counted by
/// reason.
const LISTED: usize = 8;

/// The values of one message that were not stored, summed up for its one rejection.
#[derive(Default)]
struct Refused {
    count: u32,
    /// The first refused value's reason, the rejection's own.
    first: Option<RejectReason>,
    by_reason: Vec<(RejectReason, u32)>,
    listed: Vec<String>,
}

impl Refused {
    fn add(&mut self, reason: RejectReason, detail: String) {
        self.add_many(reason, 1, Some(detail));
    }

    /// `n` values refused for `reason`, the first of them named by `detail`.
    fn add_many(&mut self, reason: RejectReason, n: u32, detail: Option<String>) {
        if n == 0 {
            return;
        }
        self.count += n;
        self.first.get_or_insert(reason);
        match self.by_reason.iter_mut().find(|(r, _)| *r == reason) {
            Some((_, count)) => *count += n,
            None => self.by_reason.push((reason, n)),
        }
        if let Some(detail) = detail
            && self.listed.len() < LISTED
        {
            self.listed.push(detail);
        }
    }

    /// The values the decoder found that cannot be readings.
    fn add_skipped(&mut self, skipped: &Skipped) {
        for detail in &skipped.listed {
            self.add(RejectReason::NotNumeric, detail.clone());
        }
        let unnamed = skipped.count.saturating_sub(skipped.listed.len() as u32);
        self.add_many(RejectReason::NotNumeric, unnamed, None);
    }

    /// One sentence for one refused value; otherwise how many of the message's `values`,
    /// by reason, and the first few.
    fn into_rejection(self, message: &Message, values: usize) -> Option<Rejection> {
        let reason = self.first?;
        let detail = if self.count == 1 {
            self.listed.concat()
        } else {
            let reasons: Vec<String> = self
                .by_reason
                .iter()
                .map(|(reason, n)| format!("{reason} {n}"))
                .collect();
            let more = self.count as usize - self.listed.len();
            let mut detail = format!(
                "{} of {values} values not stored ({}): {}",
                self.count,
                reasons.join(", "),
                self.listed.join("; ")
            );
            if more > 0 {
                detail.push_str(&format!("; and {more} more"));
            }
            detail
        };
        Some(Rejection {
            values: self.count,
            ..Rejection::whole(
                Some(message.device.clone()),
                message.source.clone(),
                message.received_at,
                reason,
                detail,
                message.raw.clone(),
            )
        })
    }
}

struct MetricRule {
    name: String,
    unit: Option<String>,
    min: Option<f64>,
    max: Option<f64>,
    /// Interned at the first reading, so a payload's unit can stand in for a missing one.
    series: Option<Series>,
}

#[derive(Default)]
struct DeviceRules {
    /// By payload field.
    metrics: FastMap<String, MetricRule>,
    /// Metrics the config does not list that were accepted in this run, by payload field.
    extra: FastMap<Arc<str>, Series>,
}

pub struct Validator {
    devices: FastMap<DeviceId, DeviceRules>,
    limits: ValidationConfig,
    /// Per series key: the last receive-time stamp handed out.
    last_receive_stamp: Vec<Millis>,
    /// Per device: the latest receive-time stamp handed out to any of its series. A message
    /// without source times is stamped once, after it, so the readings of one line share
    /// one time and the next line's come after all of them.
    device_clock: FastMap<DeviceId, Millis>,
    /// Every series interned so far, so a reload keeps the keys of unchanged metrics.
    interned: HashMap<(DeviceId, String, Option<String>), Series>,
    /// Per device, every metric beyond its config it has, in the database or accepted in
    /// this run: bounded by `max_metrics_per_device`, across restarts and reloads (a
    /// device a reload adds back finds its own).
    beyond_config: FastMap<DeviceId, FastSet<Arc<str>>>,
}

impl Validator {
    /// Rules for `config`'s devices. `stored` lists the (device, metric) series the
    /// database already holds, so metrics beyond a device's config that earlier runs
    /// accepted count against `max_metrics_per_device` from the start.
    pub fn new(config: &Config, stored: &[(String, String)]) -> Self {
        let mut validator = Self {
            devices: FastMap::default(),
            limits: config.validation.clone(),
            last_receive_stamp: Vec::new(),
            device_clock: FastMap::default(),
            interned: HashMap::new(),
            beyond_config: FastMap::default(),
        };
        for (device, metric) in stored {
            validator
                .beyond_config
                .entry(DeviceId::new(device))
                .or_default()
                .insert(Arc::from(metric.as_str()));
        }
        validator.reconfigure(config);
        validator
    }

    /// Takes a reloaded config's devices and limits. Metrics a device keeps keep their
    /// series; metrics it sends beyond its config stay accepted.
    pub fn reconfigure(&mut self, config: &Config) {
        let mut previous = std::mem::take(&mut self.devices);
        for device in &config.devices {
            let id = DeviceId::new(device.id());
            let metrics = device
                .metrics()
                .iter()
                .map(|m| {
                    let rule = MetricRule {
                        name: m.name.clone(),
                        unit: m.unit.clone(),
                        min: m.min,
                        max: m.max,
                        series: None,
                    };
                    (m.field().to_string(), rule)
                })
                .collect();
            let extra = previous
                .remove(&id)
                .map(|old| old.extra)
                .unwrap_or_default();
            // A metric the config lists takes no place among those beyond it.
            if let Some(beyond) = self.beyond_config.get_mut(&id) {
                for metric in device.metrics() {
                    beyond.remove(metric.name.as_str());
                }
            }
            self.devices.insert(id, DeviceRules { metrics, extra });
        }
        self.limits = config.validation.clone();
    }

    /// Checks every value of `message`. The values that are not stored make one rejection
    /// holding the message once.
    pub fn check(&mut self, message: &Message) -> Checked {
        let raw_readings = match &message.decoded {
            Ok(readings) => readings,
            Err(err) => {
                return Checked {
                    readings: Vec::new(),
                    rejection: Some(Rejection::whole(
                        Some(message.device.clone()),
                        message.source.clone(),
                        message.received_at,
                        err.reason,
                        err.detail.clone(),
                        message.raw.clone(),
                    )),
                };
            }
        };
        let mut readings = Vec::with_capacity(raw_readings.len());
        let mut refused = Refused::default();
        refused.add_skipped(&raw_readings.skipped);
        let mut clock = MessageClock::default();
        for raw in raw_readings.iter() {
            match self.check_one(&message.device, message.received_at, raw, &mut clock) {
                Ok(reading) => readings.push(reading),
                Err((reason, detail)) => refused.add(reason, detail),
            }
        }
        if let Some(latest) = clock.latest {
            match self.device_clock.get_mut(&message.device) {
                Some(last) => *last = latest,
                None => {
                    self.device_clock.insert(message.device.clone(), latest);
                }
            }
        }
        Checked {
            readings,
            rejection: refused.into_rejection(
                message,
                raw_readings.len() + raw_readings.skipped.count as usize,
            ),
        }
    }

    /// The series `raw` belongs to, with its configured limits; interns a metric the config
    /// does not list when the policy and the cap allow it.
    fn series_of(
        &mut self,
        device: &DeviceId,
        raw: &RawReading,
    ) -> Result<(Series, Limits), Invalid> {
        let stamps = &mut self.last_receive_stamp;
        let interned = &mut self.interned;
        let Some(rules) = self.devices.get_mut(device) else {
            return Err((
                RejectReason::UnknownDevice,
                format!("device `{device}` is not configured"),
            ));
        };
        if let Some(rule) = rules.metrics.get_mut(&*raw.field) {
            let unit = rule.unit.as_deref().or(raw.unit.as_deref());
            let series = rule
                .series
                .get_or_insert_with(|| intern(interned, stamps, device, &rule.name, unit));
            return Ok((series.clone(), (rule.min, rule.max)));
        }
        if let Some(series) = rules.extra.get(&*raw.field) {
            return Ok((series.clone(), (None, None)));
        }
        if !rules.metrics.is_empty() && self.limits.unknown_metrics == UnknownMetrics::Reject {
            return Err((
                RejectReason::UnknownMetric,
                format!(
                    "metric `{}` is not configured for device `{device}`",
                    raw.field
                ),
            ));
        }
        let beyond = self.beyond_config.entry(device.clone()).or_default();
        if !beyond.contains(&*raw.field) {
            if beyond.len() >= self.limits.max_metrics_per_device {
                return Err((
                    RejectReason::TooManyMetrics,
                    format!(
                        "metric `{}`: device `{device}` already has {} metrics its config does \
                         not list (validation.max_metrics_per_device)",
                        raw.field,
                        beyond.len()
                    ),
                ));
            }
            beyond.insert(raw.field.clone());
        }
        let series = intern(interned, stamps, device, &raw.field, raw.unit.as_deref());
        rules.extra.insert(raw.field.clone(), series.clone());
        Ok((series, (None, None)))
    }

    fn check_one(
        &mut self,
        device: &DeviceId,
        received_at: Millis,
        raw: &RawReading,
        clock: &mut MessageClock,
    ) -> Result<Reading, Invalid> {
        let (series, (min, max)) = self.series_of(device, raw)?;
        let metric = series.metric();
        if !raw.value.is_finite() {
            return Err((
                RejectReason::NotFinite,
                format!("{metric} = {} is not a finite number", raw.value),
            ));
        }
        if let Some(min) = min.filter(|min| raw.value < *min) {
            return Err((
                RejectReason::OutOfRange,
                format!("{metric} = {} is below min {min}", raw.value),
            ));
        }
        if let Some(max) = max.filter(|max| raw.value > *max) {
            return Err((
                RejectReason::OutOfRange,
                format!("{metric} = {} is above max {max}", raw.value),
            ));
        }
        let mut flags = 0;
        let time = match raw.source_time {
            Some(time) => {
                let ahead = time - received_at;
                let limit = |d: std::time::Duration| d.as_millis() as Millis;
                if ahead > limit(self.limits.max_future) {
                    return Err((
                        RejectReason::BadTimestamp,
                        format!(
                            "{metric}: timestamp {} is {} ahead of the gateway clock (max_future {})",
                            format_rfc3339(time),
                            humantime::format_duration(std::time::Duration::from_millis(
                                ahead as u64
                            )),
                            humantime::format_duration(self.limits.max_future)
                        ),
                    ));
                }
                if -ahead > limit(self.limits.max_past) {
                    return Err((
                        RejectReason::BadTimestamp,
                        format!(
                            "{metric}: timestamp {} is older than max_past {}",
                            format_rfc3339(time),
                            humantime::format_duration(self.limits.max_past)
                        ),
                    ));
                }
                if ahead.abs() > limit(self.limits.max_skew) {
                    flags |= ReadingFlags::SKEWED;
                }
                time
            }
            None => {
                flags |= ReadingFlags::RECEIVE_TIME;
                let stamp = *clock.stamp.get_or_insert_with(|| {
                    let after = self.device_clock.get(device).map(|t| t.saturating_add(1));
                    received_at.max(after.unwrap_or(Millis::MIN))
                });
                // Only a series repeated within the message moves past the message's stamp.
                let last = &mut self.last_receive_stamp[series.key().0 as usize];
                *last = stamp.max(last.saturating_add(1));
                clock.latest = clock.latest.max(Some(*last));
                *last
            }
        };
        Ok(Reading {
            series,
            value: raw.value,
            time,
            received_at,
            flags: ReadingFlags(flags),
        })
    }
}

/// The receive-time stamp of one message: taken at its first reading without a source
/// time, after everything its device was stamped with before.
#[derive(Default)]
struct MessageClock {
    stamp: Option<Millis>,
    latest: Option<Millis>,
}

/// The series of a device's metric with its unit: the one interned before, or a new one
/// with the next key (`stamps` holds one entry per key).
fn intern(
    interned: &mut HashMap<(DeviceId, String, Option<String>), Series>,
    stamps: &mut Vec<Millis>,
    device: &DeviceId,
    metric: &str,
    unit: Option<&str>,
) -> Series {
    let name = (device.clone(), metric.to_string(), unit.map(str::to_string));
    interned
        .entry(name)
        .or_insert_with(|| {
            let key = SeriesKey(stamps.len() as u32);
            stamps.push(Millis::MIN);
            Series::new(SeriesInfo {
                key,
                device: device.clone(),
                metric: Arc::from(metric),
                unit: unit.map(Arc::from),
            })
        })
        .clone()
}

#[cfg(test)]
mod tests;
