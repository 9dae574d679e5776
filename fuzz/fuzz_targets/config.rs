//! The config parser: any text is a config or an error naming a line of the file, never a
//! panic; what it accepts, the gateway can start with: every duration makes a deadline and
//! a millisecond count, every channel can be made, and the decoders, validator, framers and
//! read plans build.
#![no_main]

use std::path::Path;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use sensorgate::config::{Config, ConfigError, DeviceConfig, parse};
use sensorgate::decode::registers::plan_reads;
use sensorgate::decode::{DecodeLimits, Decoder};
use sensorgate::pipeline::validate::Validator;
use sensorgate::sources::framing::LineFramer;

/// Every duration an accepted config holds.
fn durations(config: &Config) -> Vec<Duration> {
    let storage = &config.storage;
    let retention = &storage.retention;
    let validation = &config.validation;
    let mut all = vec![
        storage.flush_interval,
        storage.busy_timeout,
        retention.interval,
        config.pipeline.drain_timeout,
        validation.max_skew,
        validation.max_future,
        validation.max_past,
    ];
    all.extend(
        [retention.readings, retention.rollups, retention.rejections]
            .into_iter()
            .flatten(),
    );
    all.extend(&config.rollups.windows);
    for broker in &config.brokers {
        all.extend([broker.keep_alive, broker.reconnect_max]);
    }
    for port in &config.serial_ports {
        all.extend([port.timeout, port.reconnect_max]);
    }
    for device in &config.devices {
        match device {
            DeviceConfig::Mqtt(d) => all.extend(d.expected_interval),
            DeviceConfig::Serial(d) => {
                all.extend(d.expected_interval.into_iter().chain(d.poll_interval))
            }
            DeviceConfig::Modbus(d) => all.push(d.poll_interval),
        }
    }
    all
}

/// What start-up does with the config, short of I/O.
fn start(config: &Config) {
    let now = Instant::now();
    for duration in durations(config) {
        assert!(
            now.checked_add(duration).is_some(),
            "{duration:?} makes no deadline"
        );
        assert!(
            i64::try_from(duration.as_millis()).is_ok(),
            "{duration:?} is no Millis"
        );
    }
    tokio::sync::mpsc::channel::<()>(config.pipeline.channel_capacity);
    tokio::sync::mpsc::channel::<()>(config.pipeline.device_queue);
    tokio::sync::broadcast::channel::<()>(config.http.stream_buffer);
    Validator::new(config, &[]);
    let limits = DecodeLimits::new(&config.validation);
    for device in &config.devices {
        if let Some(options) = device.format_options() {
            let fields = device.metrics().iter().map(|m| m.field().to_string());
            Decoder::new(&options, fields.collect(), limits.clone())
                .expect("the config check compiled it");
        }
        match device {
            DeviceConfig::Serial(serial) => {
                LineFramer::new(serial.terminator.as_bytes(), serial.max_line);
            }
            DeviceConfig::Modbus(modbus) => {
                plan_reads(&modbus.registers);
            }
            DeviceConfig::Mqtt(_) => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // `load` refuses a file that is not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse(text, Path::new("fuzz.toml")) {
        Ok(config) => start(&config),
        Err(ConfigError::Invalid {
            path,
            line,
            message,
        }) => {
            let lines = text.matches('\n').count() + 1;
            assert!((1..=lines).contains(&line), "line {line} of {lines}");
            assert_eq!(path, Path::new("fuzz.toml"));
            assert!(!message.trim().is_empty(), "an error without a message");
        }
        Err(other) => panic!("parsing text gave {other}"),
    }
});
