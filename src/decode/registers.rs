//! Modbus register maps: which requests read a slave's configured registers, and how the
//! words (or bits) that come back become values. Pure; the bus I/O lives in
//! `sources::modbus`.

use std::sync::Arc;

use crate::config::{DataType, RegisterConfig, RegisterTable, WordOrder};
use crate::reading::RawReading;

/// The most registers one read may ask for (Modbus: 125 words, 2000 bits).
const MAX_WORDS: u16 = 125;
const MAX_BITS: u16 = 2000;

/// One read request: a run of adjacent addresses in one table, and the registers it covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadBlock {
    pub table: RegisterTable,
    pub start: u16,
    pub count: u16,
    /// Indexes into the device's register list.
    pub registers: Vec<usize>,
}

/// The fewest reads that cover `registers`: adjacent or overlapping registers of one table
/// share a read, up to the protocol's size limit. Gaps are never read across, because many
/// devices answer a read that touches an unmapped address with an exception.
pub fn plan_reads(registers: &[RegisterConfig]) -> Vec<ReadBlock> {
    let mut order: Vec<usize> = (0..registers.len()).collect();
    order.sort_by_key(|&i| (registers[i].table, registers[i].address));
    let mut blocks: Vec<ReadBlock> = Vec::new();
    for i in order {
        let register = &registers[i];
        let end = u32::from(register.address) + u32::from(register.width());
        let limit = match register.table {
            RegisterTable::Holding | RegisterTable::Input => MAX_WORDS,
            RegisterTable::Coil | RegisterTable::Discrete => MAX_BITS,
        };
        if let Some(block) = blocks.last_mut()
            && block.table == register.table
            && u32::from(register.address) <= u32::from(block.start) + u32::from(block.count)
            && end - u32::from(block.start) <= u32::from(limit)
        {
            block.count = block.count.max((end - u32::from(block.start)) as u16);
            block.registers.push(i);
            continue;
        }
        blocks.push(ReadBlock {
            table: register.table,
            start: register.address,
            count: register.width(),
            registers: vec![i],
        });
    }
    blocks
}

/// What a read returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Words(Vec<u16>),
    Bits(Vec<bool>),
}

/// The values of a block's registers from the read's answer, scaled and offset.
///
/// # Errors
/// When the answer is shorter than the block (a device that answers with fewer registers
/// than asked for).
pub fn decode_block(
    registers: &[RegisterConfig],
    block: &ReadBlock,
    answer: &Answer,
) -> Result<Vec<RawReading>, String> {
    let mut out = Vec::with_capacity(block.registers.len());
    for &i in &block.registers {
        let register = &registers[i];
        let at = usize::from(register.address - block.start);
        let width = usize::from(register.width());
        let raw = match answer {
            Answer::Words(words) => {
                let words = words
                    .get(at..at + width)
                    .ok_or_else(|| short(block, answer))?;
                from_words(register.data_type, register.word_order, words)
            }
            Answer::Bits(bits) => {
                let bit = bits.get(at).ok_or_else(|| short(block, answer))?;
                f64::from(u8::from(*bit))
            }
        };
        out.push(RawReading {
            field: Arc::from(register.name.as_str()),
            value: converted(raw, register.scale, register.offset),
            unit: None,
            source_time: None,
        });
    }
    Ok(out)
}

/// `raw * scale + offset`. Without an offset the sign of a float register's zero is kept:
/// adding 0 would turn -0 into +0.
fn converted(raw: f64, scale: f64, offset: f64) -> f64 {
    let value = scaled(raw, scale);
    if offset == 0.0 { value } else { value + offset }
}

/// `raw * scale`, computed as a division when `scale` is the inverse of a whole number, so a
/// register holding 215 with scale 0.1 is stored as exactly 21.5 (215 × 0.1 is
/// 21.500000000000004 in floating point).
fn scaled(raw: f64, scale: f64) -> f64 {
    let divisor = (1.0 / scale).round();
    if scale.abs() < 1.0 && divisor != 0.0 && (divisor * scale - 1.0).abs() < 1e-12 {
        raw / divisor
    } else {
        raw * scale
    }
}

fn short(block: &ReadBlock, answer: &Answer) -> String {
    let got = match answer {
        Answer::Words(w) => w.len(),
        Answer::Bits(b) => b.len(),
    };
    format!(
        "asked for {} registers at {}, got {got}",
        block.count, block.start
    )
}

/// A register's raw value from its words, in the device's word order.
pub fn from_words(data_type: DataType, order: WordOrder, words: &[u16]) -> f64 {
    let pair = || {
        let (high, low) = match order {
            WordOrder::Big => (words[0], words[1]),
            WordOrder::Little => (words[1], words[0]),
        };
        (u32::from(high) << 16) | u32::from(low)
    };
    match data_type {
        DataType::U16 => f64::from(words[0]),
        DataType::I16 => f64::from(words[0] as i16),
        DataType::U32 => f64::from(pair()),
        DataType::I32 => f64::from(pair() as i32),
        DataType::F32 => f64::from(f32::from_bits(pair())),
    }
}

/// An answer as bytes, kept as the raw payload of a rejection.
pub fn answer_bytes(answer: &Answer) -> Vec<u8> {
    match answer {
        Answer::Words(words) => words.iter().flat_map(|w| w.to_be_bytes()).collect(),
        Answer::Bits(bits) => bits.iter().map(|b| u8::from(*b)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn register(
        name: &str,
        table: RegisterTable,
        address: u16,
        data_type: DataType,
    ) -> RegisterConfig {
        RegisterConfig {
            name: name.into(),
            table,
            address,
            data_type,
            word_order: WordOrder::Big,
            scale: 1.0,
            offset: 0.0,
            unit: None,
            min: None,
            max: None,
        }
    }

    #[test]
    fn adjacent_registers_share_a_read_and_gaps_split_it() {
        use RegisterTable::*;
        let map = vec![
            register("energy", Holding, 10, DataType::U32),
            register("voltage", Input, 0, DataType::F32),
            register("current", Input, 2, DataType::F32),
            register("power", Input, 4, DataType::F32),
            register("temp", Input, 20, DataType::I16),
            register("alarm", Coil, 0, DataType::U16),
            register("relay", Coil, 1, DataType::U16),
        ];
        let blocks = plan_reads(&map);
        let summary: Vec<_> = blocks
            .iter()
            .map(|b| (b.table, b.start, b.count, b.registers.clone()))
            .collect();
        assert_eq!(
            summary,
            vec![
                (Holding, 10, 2, vec![0]),
                (Input, 0, 6, vec![1, 2, 3]),
                (Input, 20, 1, vec![4]),
                (Coil, 0, 2, vec![5, 6]),
            ]
        );
    }

    #[test]
    fn a_read_never_exceeds_125_registers() {
        let map: Vec<_> = (0..100)
            .map(|i| {
                register(
                    &format!("r{i}"),
                    RegisterTable::Holding,
                    i * 2,
                    DataType::F32,
                )
            })
            .collect();
        let blocks = plan_reads(&map);
        assert!(blocks.iter().all(|b| b.count <= 125));
        assert_eq!(blocks.iter().map(|b| b.registers.len()).sum::<usize>(), 100);
        assert_eq!(blocks.len(), 2);
    }

    #[test]
    fn decimal_scales_give_the_decimal_value_exactly() {
        for raw in 0..100_000u32 {
            let raw = f64::from(raw);
            assert_eq!(scaled(raw, 0.1), raw / 10.0);
            assert_eq!(scaled(raw, 0.01), raw / 100.0);
            assert_eq!(scaled(raw, 0.001), raw / 1000.0);
        }
        assert_eq!(scaled(3.0, 2.5), 7.5);
        assert_eq!(scaled(3.0, -0.5), -1.5);
    }

    #[test]
    fn words_decode_by_type_and_word_order() {
        let f = 230.5f32.to_bits();
        let (hi, lo) = ((f >> 16) as u16, f as u16);
        assert_eq!(from_words(DataType::F32, WordOrder::Big, &[hi, lo]), 230.5);
        assert_eq!(
            from_words(DataType::F32, WordOrder::Little, &[lo, hi]),
            230.5
        );
        assert_eq!(from_words(DataType::U32, WordOrder::Big, &[1, 2]), 65_538.0);
        assert_eq!(
            from_words(DataType::U32, WordOrder::Little, &[2, 1]),
            65_538.0
        );
        assert_eq!(
            from_words(DataType::I32, WordOrder::Big, &[0xFFFF, 0xFFFE]),
            -2.0
        );
        assert_eq!(from_words(DataType::I16, WordOrder::Big, &[0xFF38]), -200.0);
        assert_eq!(
            from_words(DataType::U16, WordOrder::Big, &[0xFF38]),
            65_336.0
        );
    }

    #[test]
    fn values_are_scaled_and_offset_and_short_answers_refused() {
        let mut temp = register("temp", RegisterTable::Input, 4, DataType::I16);
        temp.scale = 0.1;
        temp.offset = -1.0;
        let map = vec![temp];
        let block = &plan_reads(&map)[0];
        let got = decode_block(&map, block, &Answer::Words(vec![215])).unwrap();
        assert_eq!(got[0].value, 20.5);
        assert_eq!(&*got[0].field, "temp");
        let err = decode_block(&map, block, &Answer::Words(vec![])).unwrap_err();
        assert!(err.contains("got 0"), "{err}");
    }

    /// Found by the modbus_registers fuzz target: -0 came out as +0.
    #[test]
    fn a_float_register_holding_negative_zero_keeps_its_sign() {
        let map = vec![register("flow", RegisterTable::Holding, 0, DataType::F32)];
        let block = &plan_reads(&map)[0];
        let got = decode_block(&map, block, &Answer::Words(vec![0x8000, 0])).unwrap();
        assert_eq!(got[0].value.to_bits(), (-0.0f64).to_bits());
    }
}
