//! A filter between a broker's socket and rumqttc that cuts every PUBLISH whose payload is
//! larger than the broker's `max_payload` down to its first [`RAW_PREFIX`] bytes, and reads
//! and drops the rest as it arrives.
//!
//! rumqttc refuses a packet above its size limit by closing the connection. With a
//! persistent session the broker sends the same packet again on every reconnect, and nothing
//! else from that broker is ever stored: one oversized publish jams the session. Behind this
//! filter rumqttc only ever sees a small packet with the real topic, QoS and packet id, which
//! the session stores as a `too_large` rejection and acknowledges after its commit like any
//! other message. Memory stays bounded whatever the size: the filter holds a packet's fixed
//! header and topic, never its payload.
//!
//! The filter only parses what MQTT 3.1.1 fixes for every packet (a type byte, a variable
//! length) and, for a PUBLISH over the limit, its topic and packet id. Anything it does not
//! understand it passes on untouched, for rumqttc to refuse.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::reading::RAW_PREFIX;

/// Packet types, in the high nibble of a packet's first byte.
const PUBLISH: u8 = 3;
pub(super) const PINGREQ: u8 = 12;
const PINGRESP: u8 = 13;
/// A whole PINGRESP packet.
pub(super) const PINGRESP_PACKET: [u8; 2] = [PINGRESP << 4, 0];

/// A publish the filter cut: the `ordinal`-th PUBLISH of its connection (from 0), whose
/// payload had `size` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Cut {
    pub ordinal: u64,
    pub size: usize,
}

/// The cuts of one connection, in order, for the session to pair with the publishes rumqttc
/// hands it.
#[derive(Debug, Default)]
pub(super) struct Cuts(Mutex<VecDeque<Cut>>);

impl Cuts {
    /// The payload size of the `ordinal`-th publish when the filter cut it.
    pub fn take(&self, ordinal: u64) -> Option<usize> {
        let mut cuts = self.0.lock().unwrap_or_else(|p| p.into_inner());
        // Earlier ones were passed over (a publish the session did not take).
        while cuts.front().is_some_and(|c| c.ordinal < ordinal) {
            cuts.pop_front();
        }
        cuts.pop_front_if(|c| c.ordinal == ordinal).map(|c| c.size)
    }

    fn push(&self, cut: Cut) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(cut);
    }
}

/// A packet's fixed header as it arrives: the type byte and one to four length bytes.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct FixedHeader {
    bytes: [u8; 5],
    len: usize,
}

/// What one more byte made of a fixed header.
pub(super) enum HeaderByte {
    More,
    /// Complete: the type byte and the remaining length.
    Done {
        first: u8,
        remaining: usize,
    },
    /// A fifth length byte: not MQTT.
    Broken,
}

impl FixedHeader {
    pub(super) fn push(&mut self, byte: u8) -> HeaderByte {
        self.bytes[self.len] = byte;
        self.len += 1;
        if self.len == 1 || byte & 0x80 != 0 {
            return if self.len == self.bytes.len() {
                HeaderByte::Broken
            } else {
                HeaderByte::More
            };
        }
        let remaining = self.bytes[1..self.len]
            .iter()
            .rev()
            .fold(0usize, |n, b| (n << 7) | usize::from(b & 0x7f));
        HeaderByte::Done {
            first: self.bytes[0],
            remaining,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// Where the filter is in the byte stream.
#[derive(Debug)]
enum State {
    /// Reading a fixed header.
    Header(FixedHeader),
    /// Passing on this many more bytes of the current packet.
    Pass(usize),
    /// A PUBLISH longer than the payload limit: its topic and packet id are read before any
    /// of it goes on.
    Head {
        first: u8,
        remaining: usize,
        ordinal: u64,
        head: Vec<u8>,
    },
    /// Passing on the kept prefix of a cut payload, then dropping the rest.
    Prefix { keep: usize, drop: usize },
    /// Dropping this many more bytes of a cut payload.
    Drop(usize),
    /// A header that is not MQTT: everything from here goes on untouched.
    Broken,
}

impl State {
    fn header() -> Self {
        Self::Header(FixedHeader::default())
    }

    fn after(remaining: usize) -> Self {
        if remaining == 0 {
            Self::header()
        } else {
            Self::Pass(remaining)
        }
    }
}

/// The pure part: bytes from the broker in, bytes for rumqttc out.
#[derive(Debug)]
pub(super) struct Filter {
    max_payload: usize,
    state: State,
    publishes: u64,
    /// PINGRESPs passed on.
    pub(super) pongs: u64,
    cuts: Arc<Cuts>,
}

impl Filter {
    pub fn new(max_payload: usize, cuts: Arc<Cuts>) -> Self {
        Self {
            max_payload,
            state: State::header(),
            publishes: 0,
            pongs: 0,
            cuts,
        }
    }

    /// Dropping the rest of a cut payload: what went on so far ends at a packet boundary.
    pub fn dropping(&self) -> bool {
        matches!(self.state, State::Drop(_))
    }

    /// Takes every byte of `input`, appending what goes on to `out`.
    pub fn feed(&mut self, mut input: &[u8], out: &mut Vec<u8>) {
        while !input.is_empty() {
            input = self.step(input, out);
        }
    }

    /// Takes some of `input`; returns the rest.
    fn step<'a>(&mut self, input: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        match &mut self.state {
            State::Header(header) => {
                let (first, remaining) = match header.push(input[0]) {
                    HeaderByte::More => return &input[1..],
                    HeaderByte::Broken => {
                        out.extend_from_slice(header.bytes());
                        self.state = State::Broken;
                        return &input[1..];
                    }
                    HeaderByte::Done { first, remaining } => (first, remaining),
                };
                match first >> 4 {
                    PUBLISH => {
                        let ordinal = self.publishes;
                        self.publishes += 1;
                        if remaining > self.max_payload {
                            self.state = State::Head {
                                first,
                                remaining,
                                ordinal,
                                head: Vec::new(),
                            };
                            return &input[1..];
                        }
                    }
                    PINGRESP => self.pongs += 1,
                    _ => {}
                }
                out.extend_from_slice(header.bytes());
                self.state = State::after(remaining);
                &input[1..]
            }
            State::Pass(left) => {
                let take = (*left).min(input.len());
                out.extend_from_slice(&input[..take]);
                *left -= take;
                if *left == 0 {
                    self.state = State::header();
                }
                &input[take..]
            }
            State::Head {
                first,
                remaining,
                ordinal,
                head,
            } => {
                // Topic length (2 bytes), topic, and a packet id (2 bytes) above QoS 0.
                let id_len = if (*first >> 1) & 3 == 0 { 0 } else { 2 };
                let known = head.len() >= 2;
                let need = if known {
                    2 + usize::from(u16::from_be_bytes([head[0], head[1]])) + id_len
                } else {
                    2
                };
                let take = (need - head.len()).min(input.len());
                head.extend_from_slice(&input[..take]);
                let rest = &input[take..];
                // With the topic's length just read, the next step knows what it needs.
                if !known || head.len() < need {
                    return rest;
                }
                let (first, remaining, ordinal) = (*first, *remaining, *ordinal);
                let head = std::mem::take(head);
                let Some(payload) = remaining.checked_sub(head.len()) else {
                    // A topic longer than the packet: rumqttc refuses it.
                    write_header(out, first, remaining);
                    out.extend_from_slice(&head);
                    self.state = State::Broken;
                    return rest;
                };
                if payload <= self.max_payload {
                    write_header(out, first, remaining);
                    out.extend_from_slice(&head);
                    self.state = State::after(payload);
                    return rest;
                }
                let keep = payload.min(RAW_PREFIX);
                write_header(out, first, head.len() + keep);
                out.extend_from_slice(&head);
                self.cuts.push(Cut {
                    ordinal,
                    size: payload,
                });
                self.state = State::Prefix {
                    keep,
                    drop: payload - keep,
                };
                rest
            }
            State::Prefix { keep, drop } => {
                let take = (*keep).min(input.len());
                out.extend_from_slice(&input[..take]);
                *keep -= take;
                if *keep == 0 {
                    self.state = match *drop {
                        0 => State::header(),
                        drop => State::Drop(drop),
                    };
                }
                &input[take..]
            }
            State::Drop(left) => {
                let take = (*left).min(input.len());
                *left -= take;
                if *left == 0 {
                    self.state = State::header();
                }
                &input[take..]
            }
            State::Broken => {
                out.extend_from_slice(input);
                &[]
            }
        }
    }
}

/// A fixed header: the type byte and the remaining length in MQTT's variable-length code.
fn write_header(out: &mut Vec<u8>, first: u8, mut remaining: usize) {
    out.push(first);
    loop {
        let mut byte = (remaining & 0x7f) as u8;
        remaining >>= 7;
        if remaining > 0 {
            byte |= 0x80;
        }
        out.push(byte);
        if remaining == 0 {
            return;
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use bytes::BytesMut;
    use proptest::prelude::*;
    use rumqttc::{Packet, Publish, QoS};

    use super::*;

    /// A publish as the broker writes it.
    pub(in crate::sources::mqtt) fn publish(
        topic: &str,
        qos: QoS,
        pkid: u16,
        payload: Vec<u8>,
    ) -> Vec<u8> {
        let mut publish = Publish::new(topic, qos, payload);
        publish.pkid = pkid;
        let mut out = BytesMut::new();
        Packet::Publish(publish)
            .write(&mut out, usize::MAX)
            .expect("encodes");
        out.to_vec()
    }

    /// What rumqttc reads from `bytes`, in order.
    pub(in crate::sources::mqtt) fn packets(bytes: &[u8]) -> Vec<Packet> {
        let mut buf = BytesMut::from(bytes);
        let mut packets = Vec::new();
        while !buf.is_empty() {
            packets.push(Packet::read(&mut buf, 1 << 20).expect("a whole packet"));
        }
        packets
    }

    fn filtered(max_payload: usize, stream: &[u8], cuts: &[usize]) -> (Vec<u8>, Arc<Cuts>) {
        let shared = Arc::new(Cuts::default());
        let mut filter = Filter::new(max_payload, shared.clone());
        let mut out = Vec::new();
        let mut rest = stream;
        for &at in cuts {
            let (piece, tail) = rest.split_at(at.min(rest.len()));
            filter.feed(piece, &mut out);
            rest = tail;
        }
        filter.feed(rest, &mut out);
        (out, shared)
    }

    #[test]
    fn a_publish_over_the_limit_keeps_its_topic_id_and_first_bytes() {
        let big: Vec<u8> = (0..1_500_000u32).map(|i| i as u8).collect();
        let mut stream = publish("big/one", QoS::AtLeastOnce, 7, big.clone());
        stream.extend(publish("small", QoS::AtLeastOnce, 8, b"21.5".to_vec()));
        let (out, cuts) = filtered(1 << 20, &stream, &[3, 4000, 70_000]);
        let got = packets(&out);
        let Packet::Publish(first) = &got[0] else {
            panic!("{got:?}")
        };
        assert_eq!((first.topic.as_str(), first.pkid), ("big/one", 7));
        assert_eq!(first.qos, QoS::AtLeastOnce);
        assert_eq!(&first.payload[..], &big[..RAW_PREFIX]);
        assert_eq!(cuts.take(0), Some(big.len()));
        let Packet::Publish(second) = &got[1] else {
            panic!("{got:?}")
        };
        assert_eq!(
            (second.topic.as_str(), &second.payload[..]),
            ("small", &b"21.5"[..])
        );
        assert_eq!(cuts.take(1), None);
    }

    proptest! {
        /// Whatever the packets and however the stream is cut into reads: publishes up to
        /// the limit, and every other packet, pass byte for byte; larger ones arrive as
        /// their prefix, each named by its place in the stream.
        #[test]
        fn only_publishes_over_the_limit_change(
            sizes in prop::collection::vec((0usize..300, 0u8..3, any::<bool>()), 1..12),
            limit in 0usize..200,
            reads in prop::collection::vec(1usize..64, 0..20),
        ) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            let mut want_cuts = Vec::new();
            let mut ordinal = 0;
            for (i, (size, qos, ping)) in sizes.iter().enumerate() {
                if *ping {
                    stream.extend([0xc0, 0x00]);
                    want.extend([0xc0, 0x00]);
                    continue;
                }
                let qos = [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][*qos as usize];
                let pkid = if qos == QoS::AtMostOnce { 0 } else { i as u16 + 1 };
                let payload: Vec<u8> = (0..*size).map(|b| b as u8).collect();
                stream.extend(publish("t/x", qos, pkid, payload.clone()));
                if *size > limit {
                    let keep = payload[..(*size).min(RAW_PREFIX)].to_vec();
                    want.extend(publish("t/x", qos, pkid, keep));
                    want_cuts.push(Cut { ordinal, size: *size });
                } else {
                    want.extend(publish("t/x", qos, pkid, payload));
                }
                ordinal += 1;
            }
            let mut at = 0;
            let reads: Vec<usize> = reads.iter().map(|r| { at += r; at }).collect();
            let mut offsets = vec![0];
            offsets.extend(reads);
            let pieces: Vec<usize> = offsets.windows(2).map(|w| w[1] - w[0]).collect();
            let (out, cuts) = filtered(limit, &stream, &pieces);
            prop_assert_eq!(out, want);
            let got: Vec<Cut> = cuts.0.lock().unwrap().iter().copied().collect();
            prop_assert_eq!(got, want_cuts);
        }
    }

    #[test]
    fn bytes_that_are_not_mqtt_pass_untouched() {
        let garbage = [0x30, 0xff, 0xff, 0xff, 0xff, 0x7f, 1, 2, 3];
        let (out, _) = filtered(10, &garbage, &[]);
        assert_eq!(out, garbage);
    }
}
