//! A serial sensor that writes JSON lines: bytes go through the line framer and every line
//! through the JSON decoder, as the serial source does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sensorgate::config::PayloadFormat;
use sensorgate::sources::framing::{Frame, LineFramer};
use sensorgate_fuzz::{NOW, check_decoded, decoder};

fuzz_target!(|data: &[u8]| {
    let Some((&options, stream)) = data.split_first() else {
        return;
    };
    let terminator: &[u8] = if options & 1 == 0 { b"\n" } else { b"\r\n" };
    let max = if options & 2 == 0 { 64 } else { 1024 };
    let timestamp_field = if options & 4 == 0 { None } else { Some("ts") };
    let decoder = decoder(PayloadFormat::Json, timestamp_field, &[], &[], None, None);
    let mut framer = LineFramer::new(terminator, max);
    // Arrives in reads of a size the options pick.
    let read = usize::from(options >> 3) + 1;
    for chunk in stream.chunks(read) {
        framer.push(chunk, |frame| match frame {
            Frame::Line(line) => {
                assert!(line.len() <= max);
                check_decoded(&decoder, &line, &decoder.decode(&line, NOW));
            }
            Frame::TooLong(head) => assert_eq!(head.len(), max),
        });
    }
});
