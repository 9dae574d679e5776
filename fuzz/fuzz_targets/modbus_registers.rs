//! Modbus register maps: any map the config accepts is read in blocks that cover every
//! register once, stay within the protocol's limits and never read across a gap; any
//! answer decodes to one value per register, or (when it is short) to an error.
#![no_main]

use std::fmt::Write as _;

use libfuzzer_sys::arbitrary::{Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use sensorgate::config::{DataType, DeviceConfig, RegisterTable, WordOrder};
use sensorgate::decode::registers::{Answer, answer_bytes, decode_block, from_words, plan_reads};

const TABLES: [&str; 4] = ["holding", "input", "coil", "discrete"];
const TYPES: [&str; 5] = ["u16", "i16", "u32", "i32", "f32"];
const SCALES: [f64; 6] = [1.0, 0.1, 0.01, 0.001, 10.0, -0.5];

/// A device with a register map drawn from `u`, as config text: the config's own checks
/// decide what a valid map is.
fn config_text(u: &mut Unstructured<'_>) -> Result<String> {
    let mut text = String::from(
        "[[serial_ports]]\nid = \"bus\"\npath = \"/dev/ttyUSB0\"\n\n\
         [[devices]]\nkind = \"modbus\"\nid = \"meter\"\nport = \"bus\"\nslave = 1\n",
    );
    let registers = u.int_in_range(1..=16)?;
    for i in 0..registers {
        // Mostly near each other, so adjacent and overlapping registers are common.
        let address: u16 = if u.ratio(3, 4)? {
            u.int_in_range(0..=40)?
        } else {
            u.arbitrary()?
        };
        let table = *u.choose(&TABLES)?;
        write!(
            text,
            "\n[[devices.registers]]\nname = \"r{i}\"\ntable = \"{table}\"\naddress = {address}\n"
        )
        .unwrap();
        if u.ratio(1, 2)? {
            writeln!(text, "type = \"{}\"", u.choose(&TYPES)?).unwrap();
        }
        if u.ratio(1, 3)? {
            writeln!(text, "word_order = \"little\"").unwrap();
        }
        if u.ratio(1, 3)? {
            let scale = if u.ratio(1, 2)? {
                *u.choose(&SCALES)?
            } else {
                f64::from(u.arbitrary::<f32>()?)
            };
            writeln!(text, "scale = {scale:?}").unwrap();
        }
        if u.ratio(1, 4)? {
            writeln!(text, "offset = {:?}", f64::from(u.arbitrary::<i16>()?)).unwrap();
        }
    }
    Ok(text)
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let Ok(text) = config_text(&mut u) else {
        return;
    };
    // Non-finite scales are not TOML numbers; the config refuses zero scales and bits
    // typed wider than one.
    let Ok(config) = sensorgate::config::parse(&text, "fuzz.toml".as_ref()) else {
        return;
    };
    let DeviceConfig::Modbus(device) = &config.devices[0] else {
        unreachable!("the text holds one modbus device");
    };
    let registers = &device.registers;
    let blocks = plan_reads(registers);

    let mut covered = vec![0u32; registers.len()];
    for block in &blocks {
        let limit = match block.table {
            RegisterTable::Holding | RegisterTable::Input => 125,
            RegisterTable::Coil | RegisterTable::Discrete => 2000,
        };
        assert!(block.count >= 1 && block.count <= limit, "{block:?}");
        assert!(u32::from(block.start) + u32::from(block.count) <= 0x1_0000);
        let mut read = vec![false; usize::from(block.count)];
        for &i in &block.registers {
            covered[i] += 1;
            let r = &registers[i];
            assert_eq!(r.table, block.table);
            assert!(r.address >= block.start, "{r:?} before {block:?}");
            let at = usize::from(r.address - block.start);
            let width = usize::from(r.width());
            assert!(at + width <= read.len(), "{r:?} beyond {block:?}");
            read[at..at + width].iter_mut().for_each(|a| *a = true);
        }
        assert!(read.iter().all(|a| *a), "{block:?} reads across a gap");
    }
    assert!(covered.iter().all(|c| *c == 1), "coverage {covered:?}");

    for block in &blocks {
        let short = u.ratio(1, 8).unwrap_or(false);
        let len = if short {
            u.int_in_range(0..=block.count.saturating_sub(1))
                .unwrap_or(0)
        } else {
            block.count
        };
        let answer = match block.table {
            RegisterTable::Holding | RegisterTable::Input => Answer::Words(
                (0..len)
                    .map(|_| u.arbitrary::<u16>().unwrap_or(0))
                    .collect(),
            ),
            RegisterTable::Coil | RegisterTable::Discrete => Answer::Bits(
                (0..len)
                    .map(|_| u.arbitrary::<bool>().unwrap_or(false))
                    .collect(),
            ),
        };
        let bytes = answer_bytes(&answer);
        match &answer {
            Answer::Words(w) => assert_eq!(bytes.len(), 2 * w.len()),
            Answer::Bits(b) => assert_eq!(bytes.len(), b.len()),
        }
        match decode_block(registers, block, &answer) {
            Ok(values) => {
                assert!(!short, "a short answer decoded");
                assert_eq!(values.len(), block.registers.len());
                for (value, &i) in values.iter().zip(&block.registers) {
                    let r = &registers[i];
                    assert_eq!(*value.field, *r.name);
                    if let Answer::Words(words) = &answer {
                        let at = usize::from(r.address - block.start);
                        let raw = from_words(r.data_type, r.word_order, &words[at..]);
                        if r.scale == 1.0 && r.offset == 0.0 {
                            assert!(raw.to_bits() == value.value.to_bits() || raw.is_nan());
                        }
                        if r.data_type == DataType::U16 && r.word_order == WordOrder::Big {
                            assert_eq!(raw, f64::from(words[at]));
                        }
                    }
                }
            }
            Err(err) => {
                assert!(short, "a full answer was refused: {err}");
                assert!(!err.is_empty());
            }
        }
    }
});
