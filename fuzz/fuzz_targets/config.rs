//! The config parser: any text is a config or an error naming a line of the file, never a
//! panic; what it accepts, the gateway's pure start-up steps take without a panic.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use sensorgate::config::{ConfigError, DeviceConfig, parse};
use sensorgate::decode::Decoder;
use sensorgate::decode::registers::plan_reads;
use sensorgate::pipeline::validate::Validator;
use sensorgate::sources::framing::LineFramer;

fuzz_target!(|data: &[u8]| {
    // `load` refuses a file that is not UTF-8 before parsing.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let config = match parse(text, Path::new("fuzz.toml")) {
        Ok(config) => config,
        Err(ConfigError::Invalid {
            path,
            line,
            message,
        }) => {
            let lines = text.matches('\n').count() + 1;
            assert!((1..=lines).contains(&line), "line {line} of {lines}");
            assert_eq!(path, Path::new("fuzz.toml"));
            assert!(!message.trim().is_empty(), "an error without a message");
            return;
        }
        Err(other) => panic!("parsing text gave {other}"),
    };
    Validator::new(&config);
    for device in &config.devices {
        if let Some(options) = device.format_options() {
            let fields = device.metrics().iter().map(|m| m.field().to_string());
            Decoder::new(&options, fields.collect()).expect("the config check compiled it");
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
});
