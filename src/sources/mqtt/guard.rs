//! The broker's side of a relayed connection: its incoming bytes pass through the
//! [`Filter`](super::oversize::Filter), its outgoing ones go straight through.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::oversize::{Filter, FixedHeader, HeaderByte, PINGREQ, PINGRESP_PACKET};

/// How much the guard reads from the socket at once.
const READ_CHUNK: usize = 64 * 1024;

/// Counts the PINGREQs in the bytes rumqttc writes, packet by packet.
#[derive(Debug, Default)]
struct Pings {
    header: FixedHeader,
    /// Bytes of the current packet still to come.
    skip: usize,
    broken: bool,
    sent: u64,
}

impl Pings {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.broken {
            if self.skip > 0 {
                let n = self.skip.min(bytes.len());
                self.skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            match self.header.push(bytes[0]) {
                HeaderByte::More => {}
                HeaderByte::Broken => self.broken = true,
                HeaderByte::Done { first, remaining } => {
                    if first >> 4 == PINGREQ {
                        self.sent += 1;
                    }
                    self.skip = remaining;
                    self.header = FixedHeader::default();
                }
            }
            bytes = &bytes[1..];
        }
    }
}

/// A connection to a broker with its incoming bytes passed through a [`Filter`]; writes go
/// straight through.
///
/// While the filter drops the rest of a cut payload, which over a slow link may take longer
/// than a keep-alive, the broker's answers to rumqttc's pings wait behind it, and rumqttc
/// would give the connection up (and get the same publish again after reconnecting). So a
/// ping sent and not yet answered is answered here as soon as dropping starts; the broker's
/// own answer, later, is one rumqttc takes as well.
pub(super) struct Guarded<S> {
    inner: S,
    filter: Filter,
    chunk: Box<[u8]>,
    /// Filtered bytes not yet read, from `at`.
    out: Vec<u8>,
    at: usize,
    pings: Pings,
    /// Pings answered here.
    answered: u64,
    /// The task waiting to read, woken when a ping is written that it may answer.
    reader: Option<Waker>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, filter: Filter) -> Self {
        Self {
            inner,
            filter,
            chunk: vec![0; READ_CHUNK].into_boxed_slice(),
            out: Vec::new(),
            at: 0,
            pings: Pings::default(),
            answered: 0,
            reader: None,
        }
    }

    /// Pings written and answered by neither the broker nor this guard.
    fn unanswered(&self) -> u64 {
        self.pings
            .sent
            .saturating_sub(self.filter.pongs.max(self.answered))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.at < this.out.len() {
                let n = buf.remaining().min(this.out.len() - this.at);
                buf.put_slice(&this.out[this.at..this.at + n]);
                this.at += n;
                if this.at == this.out.len() {
                    this.out.clear();
                    this.at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.filter.dropping() && this.unanswered() > 0 {
                for _ in 0..this.unanswered() {
                    this.out.extend_from_slice(&PINGRESP_PACKET);
                }
                this.answered = this.pings.sent;
                continue;
            }
            let mut chunk = ReadBuf::new(&mut this.chunk);
            match Pin::new(&mut this.inner).poll_read(cx, &mut chunk) {
                Poll::Pending => {
                    this.reader = Some(cx.waker().clone());
                    return Poll::Pending;
                }
                Poll::Ready(result) => result?,
            }
            if chunk.filled().is_empty() {
                // The end of the stream.
                return Poll::Ready(Ok(()));
            }
            // What a read brought may all be dropped (the middle of a cut payload): then
            // read again rather than report an end.
            this.filter.feed(chunk.filled(), &mut this.out);
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let written = ready!(Pin::new(&mut this.inner).poll_write(cx, buf))?;
        this.pings.feed(&buf[..written]);
        if this.filter.dropping()
            && this.unanswered() > 0
            && let Some(reader) = this.reader.take()
        {
            reader.wake();
        }
        Poll::Ready(Ok(written))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use rumqttc::{Packet, QoS};

    use super::*;
    use crate::reading::RAW_PREFIX;
    use crate::sources::mqtt::oversize::Cuts;
    use crate::sources::mqtt::oversize::tests::{packets, publish};

    /// A ping sent while a cut payload is being dropped is answered at once: over a slow
    /// link the broker's answer waits behind the payload, and rumqttc would give up.
    #[tokio::test]
    async fn a_ping_is_answered_while_a_cut_payload_drains() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (near, mut broker) = tokio::io::duplex(64 * 1024);
        let mut guarded = Guarded::new(near, Filter::new(1000, Arc::new(Cuts::default())));
        let big = publish("a", QoS::AtLeastOnce, 1, vec![b'x'; 1 << 20]);
        // The broker has sent the first 10 kB of a 1 MiB publish, and the link stalls.
        broker.write_all(&big[..10_000]).await.unwrap();
        // Fixed header (3 bytes), topic (2 + 1), packet id (2), the kept prefix.
        let mut cut = vec![0; 3 + 3 + 2 + RAW_PREFIX];
        guarded.read_exact(&mut cut).await.unwrap();
        assert!(matches!(packets(&cut)[..], [Packet::Publish(_)]));
        guarded.write_all(&[PINGREQ << 4, 0]).await.unwrap();
        let mut answer = [0; 2];
        tokio::time::timeout(Duration::from_secs(1), guarded.read_exact(&mut answer))
            .await
            .expect("answered without the broker")
            .unwrap();
        assert_eq!(answer, PINGRESP_PACKET);
        let mut sent = [0; 2];
        broker.read_exact(&mut sent).await.unwrap();
        assert_eq!(sent, [PINGREQ << 4, 0], "the ping still reaches the broker");
    }

    #[tokio::test]
    async fn the_guard_reads_a_cut_stream_to_its_end() {
        use tokio::io::AsyncReadExt;
        let mut stream = publish("a", QoS::AtLeastOnce, 1, vec![b'x'; 100_000]);
        stream.extend(publish("b", QoS::AtLeastOnce, 2, b"1".to_vec()));
        let cuts = Arc::new(Cuts::default());
        let mut guarded = Guarded::new(&stream[..], Filter::new(1000, cuts.clone()));
        let mut out = Vec::new();
        guarded.read_to_end(&mut out).await.unwrap();
        let lengths: Vec<usize> = packets(&out)
            .iter()
            .map(|p| match p {
                Packet::Publish(p) => p.payload.len(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(lengths, [RAW_PREFIX, 1]);
        assert_eq!(cuts.take(0), Some(100_000));
    }
}
