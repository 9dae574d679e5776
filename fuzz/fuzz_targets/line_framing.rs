//! The serial line framer against a model: however the stream is cut into reads, the frames
//! are exactly those of splitting the whole stream at the terminator (a trailing `\r`
//! dropped, blank lines skipped, lines over the limit reported once by their first `max`
//! bytes), so no byte is lost, duplicated or moved between lines; what it holds stays
//! bounded.
#![no_main]

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use sensorgate::reading::Bytes;
use sensorgate::sources::framing::{Frame, LineFramer};

const TERMINATORS: [&[u8]; 6] = [b"\n", b"\r\n", b"\r", b";", b"END", b"aa"];

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The frames of the complete lines in `stream`, and the unterminated rest.
fn model(stream: &[u8], terminator: &[u8], max: usize) -> (Vec<Frame>, Vec<u8>) {
    let mut frames = Vec::new();
    let mut rest = stream;
    while let Some(at) = find(rest, terminator) {
        let line = &rest[..at];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.len() > max {
            frames.push(Frame::TooLong(Bytes::copy_from_slice(&line[..max])));
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            frames.push(Frame::Line(Bytes::copy_from_slice(line)));
        }
        rest = &rest[at + terminator.len()..];
    }
    (frames, rest.to_vec())
}

fuzz_target!(|data: &[u8]| {
    let mut u = Unstructured::new(data);
    let (Ok(t), Ok(max), Ok(cuts)) = (
        u.choose_index(TERMINATORS.len()),
        u.int_in_range(1..=48usize),
        Vec::<u8>::arbitrary(&mut u),
    ) else {
        return;
    };
    let terminator = TERMINATORS[t];
    let stream = u.take_rest();
    let keep = terminator.len() - 1;

    let mut framer = LineFramer::new(terminator, max);
    let mut got = Vec::new();
    let mut rest = stream;
    let mut cuts = cuts.iter().map(|c| usize::from(*c));
    while !rest.is_empty() {
        let n = cuts.next().unwrap_or(rest.len()).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        framer.push(chunk, |frame| got.push(frame));
        rest = tail;
        assert!(
            framer.pending() <= max + terminator.len(),
            "holds {} bytes, max {max}",
            framer.pending()
        );
    }

    let (mut want, unterminated) = model(stream, terminator, max);
    // The unfinished last line: held whole, or (once it cannot fit any more) reported by
    // its head while the framer skips to the next terminator.
    if got.len() == want.len() + 1 {
        assert!(unterminated.len() > max, "reported a line that fits");
        want.push(Frame::TooLong(Bytes::copy_from_slice(&unterminated[..max])));
        assert!(
            framer.pending() <= keep,
            "skipping, yet holds {}",
            framer.pending()
        );
    } else {
        assert_eq!(framer.pending(), unterminated.len(), "held bytes differ");
    }
    assert_eq!(got, want, "terminator {terminator:?}, max {max}");
    for frame in &got {
        let (Frame::Line(bytes) | Frame::TooLong(bytes)) = frame;
        assert!(bytes.len() <= max);
    }
});
