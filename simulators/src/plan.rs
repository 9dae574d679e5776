//! Deterministic sensor traffic: the same scenario always yields the same messages, and each
//! message says what the gateway should store for it.

/// Payload formats the simulated sensors speak.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `{"ts": <ms>, "temp": 21.5, "hum": 40.2}`
    Json,
    /// SenML: base name, base time in seconds, two records with units.
    Senml,
    /// A plain number (temperature), no timestamp.
    Value,
}

/// Faults a sensor injects, cycled through when `fault_every` is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Fault {
    /// Humidity 150 %: the temperature is stored, the humidity rejected.
    OutOfRange,
    /// A NaN temperature (JSON and value formats; SenML cannot carry one).
    NotANumber,
    /// A truncated payload (JSON, SenML) or a number with trailing text (value).
    Malformed,
    /// A timestamp one day ahead (formats with timestamps).
    ClockSkew,
    /// The previous message sent again.
    Duplicate,
}

const FAULTS: [Fault; 5] = [
    Fault::OutOfRange,
    Fault::NotANumber,
    Fault::Malformed,
    Fault::ClockSkew,
    Fault::Duplicate,
];

#[derive(Clone, Debug)]
pub struct Scenario {
    pub devices: usize,
    pub messages_per_device: u64,
    pub format: Format,
    /// Topics are `<prefix>/<device name>`.
    pub topic_prefix: String,
    /// Every n-th message of a device carries a fault; 0 for none.
    pub fault_every: u64,
    /// The first message's timestamp (epoch ms).
    pub start_ms: i64,
    /// Milliseconds between one device's consecutive timestamps.
    pub period_ms: i64,
}

impl Scenario {
    /// The simulated device's name, also the last level of its topic.
    ///
    /// ```
    /// use sensorgate_sim::{Format, Scenario};
    /// let s = Scenario {
    ///     devices: 2,
    ///     messages_per_device: 3,
    ///     format: Format::Json,
    ///     topic_prefix: "site".into(),
    ///     fault_every: 0,
    ///     start_ms: 1_700_000_000_000,
    ///     period_ms: 1000,
    /// };
    /// assert_eq!(Scenario::device_name(7), "sim-0007");
    /// assert_eq!(s.topic(1), "site/sim-0001");
    /// assert_eq!(s.messages().count(), 6);
    /// ```
    pub fn device_name(index: usize) -> String {
        format!("sim-{index:04}")
    }

    pub fn topic(&self, index: usize) -> String {
        format!("{}/{}", self.topic_prefix, Self::device_name(index))
    }

    /// Every message, device-interleaved: message 0 of every device, then message 1, ...
    pub fn messages(&self) -> impl Iterator<Item = Planned> + '_ {
        (0..self.messages_per_device)
            .flat_map(move |seq| (0..self.devices).map(move |device| self.message(device, seq)))
    }

    pub fn total_messages(&self) -> u64 {
        self.messages_per_device * self.devices as u64
    }

    /// Message `seq` of device `device`.
    pub fn message(&self, device: usize, seq: u64) -> Planned {
        let fault = (self.fault_every > 0 && seq % self.fault_every == self.fault_every - 1)
            .then(|| FAULTS[((seq / self.fault_every) % FAULTS.len() as u64) as usize]);
        let fault = match (fault, self.format) {
            (Some(Fault::NotANumber), Format::Senml) => Some(Fault::OutOfRange),
            (Some(Fault::ClockSkew | Fault::OutOfRange), Format::Value) => Some(Fault::NotANumber),
            (Some(Fault::Duplicate), _) if seq == 0 => None,
            (fault, _) => fault,
        };
        if fault == Some(Fault::Duplicate) {
            let mut again = self.message(device, seq - 1);
            // Without a source timestamp there is no idempotency key: the gateway stores a
            // repeated plain value again, under its new receive time.
            if self.format != Format::Value {
                again.expect = Expect::default();
            }
            again.fault = Some(Fault::Duplicate);
            return again;
        }
        let time = self.start_ms + seq as i64 * self.period_ms;
        let temp = temperature(device, seq);
        let hum = if fault == Some(Fault::OutOfRange) {
            150.0
        } else {
            humidity(device, seq)
        };
        let stamp = if fault == Some(Fault::ClockSkew) {
            time + 86_400_000
        } else {
            time
        };
        let nan = fault == Some(Fault::NotANumber);
        let payload = match self.format {
            Format::Json => {
                let temp = if nan {
                    "\"NaN\"".to_string()
                } else {
                    temp.to_string()
                };
                format!(r#"{{"ts":{stamp},"temp":{temp},"hum":{hum}}}"#)
            }
            Format::Senml => format!(
                r#"[{{"bn":"{}/","bt":{},"n":"temp","u":"Cel","v":{temp}}},{{"n":"hum","u":"%RH","v":{hum}}}]"#,
                Scenario::device_name(device),
                stamp as f64 / 1000.0
            ),
            Format::Value => {
                if nan {
                    "NaN".to_string()
                } else {
                    temp.to_string()
                }
            }
        };
        let payload = match (fault, self.format) {
            (Some(Fault::Malformed), Format::Value) => format!("{payload} degC"),
            (Some(Fault::Malformed), _) => payload[..payload.len() / 2].to_string(),
            _ => payload,
        };
        let timed = self.format != Format::Value;
        let mut expect = Expect::default();
        match fault {
            Some(Fault::Malformed) => expect.rejections.push("malformed"),
            Some(Fault::ClockSkew) => expect.rejections.extend(["bad_timestamp", "bad_timestamp"]),
            _ => {
                if nan {
                    expect.rejections.push("not_finite");
                } else {
                    expect
                        .readings
                        .push(("temperature", timed.then_some(time), temp));
                }
                if self.format != Format::Value {
                    if fault == Some(Fault::OutOfRange) {
                        expect.rejections.push("out_of_range");
                    } else {
                        expect.readings.push(("humidity", Some(time), hum));
                    }
                }
            }
        }
        Planned {
            device,
            topic: self.topic(device),
            payload: payload.into_bytes(),
            fault,
            expect,
        }
    }
}

/// A deterministic, realistic temperature: 15.0 to 34.9 °C.
pub fn temperature(device: usize, seq: u64) -> f64 {
    15.0 + ((device as u64 * 31 + seq * 7) % 200) as f64 / 10.0
}

/// A deterministic relative humidity: 30.0 to 79.9 %.
pub fn humidity(device: usize, seq: u64) -> f64 {
    30.0 + ((device as u64 * 17 + seq * 3) % 500) as f64 / 10.0
}

/// One message to publish and what the gateway should make of it.
#[derive(Clone, Debug)]
pub struct Planned {
    pub device: usize,
    pub topic: String,
    pub payload: Vec<u8>,
    pub fault: Option<Fault>,
    pub expect: Expect,
}

/// What a message should become. A duplicate expects nothing new.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Expect {
    /// `(metric, source time if the payload has one, value)`.
    pub readings: Vec<(&'static str, Option<i64>, f64)>,
    /// The reasons of the refused values, or of the refused payload, in order. The gateway
    /// stores one rejection per message, with the first reason.
    pub rejections: Vec<&'static str>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(format: Format) -> Scenario {
        Scenario {
            devices: 2,
            messages_per_device: 20,
            format,
            topic_prefix: "t".into(),
            fault_every: 2,
            start_ms: 1_700_000_000_000,
            period_ms: 1000,
        }
    }

    #[test]
    fn the_same_scenario_yields_the_same_messages() {
        let a: Vec<_> = scenario(Format::Json)
            .messages()
            .map(|m| m.payload)
            .collect();
        let b: Vec<_> = scenario(Format::Json)
            .messages()
            .map(|m| m.payload)
            .collect();
        assert_eq!(a, b);
        assert_eq!(a.len(), 40);
    }

    #[test]
    fn every_fault_kind_appears() {
        for format in [Format::Json, Format::Senml, Format::Value] {
            let faults: std::collections::HashSet<_> = scenario(format)
                .messages()
                .filter_map(|m| m.fault)
                .collect();
            assert!(faults.contains(&Fault::Malformed), "{format:?}");
            assert!(faults.contains(&Fault::Duplicate), "{format:?}");
        }
    }

    #[test]
    fn duplicates_repeat_the_previous_payload() {
        let s = scenario(Format::Json);
        let msgs: Vec<_> = (0..20).map(|i| s.message(0, i)).collect();
        for (i, m) in msgs.iter().enumerate() {
            if m.fault == Some(Fault::Duplicate) {
                assert_eq!(m.payload, msgs[i - 1].payload);
                assert_eq!(m.expect, Expect::default());
                let plain = scenario(Format::Value);
                assert_eq!(
                    plain.message(0, i as u64).expect,
                    plain.message(0, i as u64 - 1).expect
                );
            }
        }
    }
}
