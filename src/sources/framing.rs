//! Line framing for serial text sensors: bytes in, complete lines out. Pure, so garbage,
//! partial writes and over-long lines are tested without a port.

use crate::reading::Bytes;

/// What the framer found in the byte stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// One line without its terminator (and without a trailing `\r`).
    Line(Bytes),
    /// A line that outgrew the limit: its first `max` bytes. The rest, up to the next
    /// terminator, is skipped, so reading resumes in step with the sensor.
    TooLong(Bytes),
}

/// Splits a byte stream at a terminator, holding at most `max` bytes of a line.
#[derive(Debug)]
pub struct LineFramer {
    terminator: Vec<u8>,
    max: usize,
    buf: Vec<u8>,
    /// Inside an over-long line: bytes are skipped until the next terminator.
    skipping: bool,
}

impl LineFramer {
    /// # Panics
    /// When `terminator` is empty (the config check refuses it).
    pub fn new(terminator: &[u8], max: usize) -> Self {
        assert!(!terminator.is_empty(), "line terminator must not be empty");
        Self {
            terminator: terminator.to_vec(),
            max,
            buf: Vec::with_capacity(max.min(4096)),
            skipping: false,
        }
    }

    /// Feeds bytes as they arrived; `emit` gets every frame they complete. Blank lines are
    /// not frames.
    pub fn push(&mut self, data: &[u8], mut emit: impl FnMut(Frame)) {
        let keep = self.terminator.len() - 1;
        // Only where a terminator could newly end: the old tail may hold its first bytes.
        let mut from = self.buf.len().saturating_sub(keep);
        self.buf.extend_from_slice(data);
        let mut start = 0;
        while let Some(at) = find(&self.buf[from..], &self.terminator).map(|i| i + from) {
            let line = &self.buf[start..at];
            if std::mem::take(&mut self.skipping) {
                // The tail of an over-long line: already reported.
            } else {
                let line = line.strip_suffix(b"\r").unwrap_or(line);
                if line.len() > self.max {
                    emit(Frame::TooLong(Bytes::copy_from_slice(&line[..self.max])));
                } else if !line.iter().all(u8::is_ascii_whitespace) {
                    emit(Frame::Line(Bytes::copy_from_slice(line)));
                }
            }
            start = at + self.terminator.len();
            from = start;
        }
        self.buf.drain(..start);
        if self.skipping {
            let excess = self.buf.len().saturating_sub(keep);
            self.buf.drain(..excess);
        } else if self.buf.len() > self.max + keep + 1 {
            // Past `max` come the terminator's first bytes and a `\r` the line drops: only
            // more than that is certainly too long, however the rest arrives.
            emit(Frame::TooLong(Bytes::copy_from_slice(
                &self.buf[..self.max],
            )));
            self.skipping = true;
            let excess = self.buf.len() - keep;
            self.buf.drain(..excess);
        }
    }

    /// Bytes of an unfinished line held now; never more than `max` plus the terminator.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Forgets a partial line, as after the port was reopened.
    pub fn reset(&mut self) {
        self.buf.clear();
        self.skipping = false;
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.len() == 1 {
        return haystack.iter().position(|b| *b == needle[0]);
    }
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(framer: &mut LineFramer, chunks: &[&[u8]]) -> Vec<Frame> {
        let mut out = Vec::new();
        for chunk in chunks {
            framer.push(chunk, |f| out.push(f));
        }
        out
    }

    fn line(text: &str) -> Frame {
        Frame::Line(Bytes::copy_from_slice(text.as_bytes()))
    }

    #[test]
    fn joins_partial_writes_and_drops_carriage_returns() {
        let mut f = LineFramer::new(b"\n", 64);
        let got = frames(&mut f, &[b"temp=2", b"1.5\r\nhum=4", b"0\n\n\r\n"]);
        assert_eq!(got, vec![line("temp=21.5"), line("hum=40")]);
        assert_eq!(f.pending(), 0);
    }

    #[test]
    fn a_two_byte_terminator_split_across_reads_is_found() {
        let mut f = LineFramer::new(b"\r\n", 64);
        let got = frames(&mut f, &[b"a=1\r", b"\nb=2\r\n"]);
        assert_eq!(got, vec![line("a=1"), line("b=2")]);
    }

    #[test]
    fn an_over_long_line_is_reported_once_then_reading_resyncs() {
        let mut f = LineFramer::new(b"\n", 8);
        let got = frames(&mut f, &[b"0123456789", b"abcdefghij", b"klm\nok=1\n"]);
        assert_eq!(
            got,
            vec![
                Frame::TooLong(Bytes::from_static(b"01234567")),
                line("ok=1")
            ]
        );
        let got = frames(&mut f, &[b"0123456789abc\nok=2\n"]);
        assert_eq!(
            got,
            vec![
                Frame::TooLong(Bytes::from_static(b"01234567")),
                line("ok=2")
            ]
        );
    }

    #[test]
    fn memory_stays_bounded_by_the_limit_whatever_arrives() {
        let mut f = LineFramer::new(b"\r\n", 32);
        let mut seed = 7u32;
        for _ in 0..10_000 {
            let chunk: Vec<u8> = (0..50)
                .map(|_| {
                    seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                    (seed >> 16) as u8
                })
                .collect();
            f.push(&chunk, |frame| {
                let (Frame::Line(l) | Frame::TooLong(l)) = frame;
                assert!(l.len() <= 32);
            });
            assert!(f.pending() <= 32 + 2, "{}", f.pending());
        }
    }

    #[test]
    fn a_line_of_max_bytes_is_a_line_however_its_carriage_return_arrives() {
        // Found by fuzz/fuzz_targets/line_framing.rs: with the `\r` in one read and the `\n`
        // in the next, the line was reported too long although it fits once the `\r` is
        // dropped.
        let reads: [&[&[u8]]; 3] = [
            &[b"12345\r", b"\n"],
            &[b"12345\r\n"],
            &[b"12345", b"\r", b"\n"],
        ];
        for chunks in reads {
            let mut f = LineFramer::new(b"\n", 5);
            assert_eq!(frames(&mut f, chunks), vec![line("12345")], "{chunks:?}");
        }
        let mut f = LineFramer::new(b"\r\n", 5);
        assert_eq!(frames(&mut f, &[b"12345\r\r", b"\n"]), vec![line("12345")]);
        let mut f = LineFramer::new(b"\n", 5);
        assert_eq!(
            frames(&mut f, &[b"12345\rx", b"\n"]),
            vec![Frame::TooLong(Bytes::from_static(b"12345"))]
        );
    }

    #[test]
    fn reset_drops_a_partial_line() {
        let mut f = LineFramer::new(b"\n", 64);
        assert!(frames(&mut f, &[b"half"]).is_empty());
        f.reset();
        assert_eq!(frames(&mut f, &[b"whole\n"]), vec![line("whole")]);
    }
}
