//! Publishing a plan over MQTT at a steady rate.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rumqttc::{
    AsyncClient, Connect, ConnectReturnCode, Event, MqttOptions, Outgoing, Packet, Publish, QoS,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::plan::Planned;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot connect to the broker at {0}: {1}")]
    Connect(String, String),
    #[error("broker connection lost after {sent} publishes: {error}")]
    Lost { sent: u64, error: String },
}

/// How fast a publisher sends.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// As fast as the broker takes them.
    Unlimited,
    /// An even rate, in messages per second.
    Steady(f64),
    /// On average `rate` messages per second, sent in bursts of `size` back to back: the
    /// traffic of sensors that buffer and flush.
    Bursts { rate: f64, size: u32 },
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct PublishReport {
    pub published: u64,
    pub elapsed: Duration,
}

/// Publishes every planned message at `pace` and waits until the broker has taken them all
/// (at QoS 0, written them to the socket; at QoS 1 and 2, acknowledged them).
///
/// # Errors
/// When the broker cannot be reached or the connection drops.
pub async fn publish(
    host: &str,
    port: u16,
    client_id: &str,
    messages: impl Iterator<Item = Planned>,
    pace: Pace,
    qos: u8,
    cancel: CancellationToken,
) -> Result<PublishReport, PublishError> {
    match qos {
        0 => at_most_once(host, port, client_id, messages, pace, cancel).await,
        1 => {
            acknowledged(
                host,
                port,
                client_id,
                messages,
                pace,
                QoS::AtLeastOnce,
                cancel,
            )
            .await
        }
        _ => {
            acknowledged(
                host,
                port,
                client_id,
                messages,
                pace,
                QoS::ExactlyOnce,
                cancel,
            )
            .await
        }
    }
}

/// QoS 0 without a client library: nothing comes back to track, so the publisher encodes
/// each PUBLISH itself and writes what the pace lets go at once (a tick's worth, or up to
/// [`WRITE_SIZE`] bytes when unpaced) with one write, as a buffered client would. Through
/// rumqttc every message crossed a channel, woke its event-loop task and took a write of
/// its own: about 3 µs per message of the cores a benchmark shares with the broker and the
/// gateway it measures.
async fn at_most_once(
    host: &str,
    port: u16,
    client_id: &str,
    messages: impl Iterator<Item = Planned>,
    pace: Pace,
    cancel: CancellationToken,
) -> Result<PublishReport, PublishError> {
    let mut stream = connect_raw(host, port, client_id).await?;
    let start = Instant::now();
    let mut pacer = Pacer::new(pace);
    let mut published = 0u64;
    // Encoded but not yet written.
    let mut pending = 0u64;
    let mut buffer = BytesMut::with_capacity(WRITE_SIZE);
    for message in messages {
        if cancel.is_cancelled() {
            break;
        }
        if !pacer.try_ready() {
            write_pending(&mut stream, &mut buffer, &mut published, &mut pending).await?;
            pacer.ready().await;
        }
        encode(message, &mut buffer, published)?;
        pending += 1;
        if buffer.len() >= WRITE_SIZE {
            write_pending(&mut stream, &mut buffer, &mut published, &mut pending).await?;
        }
    }
    write_pending(&mut stream, &mut buffer, &mut published, &mut pending).await?;
    disconnect(stream).await;
    Ok(PublishReport {
        published,
        elapsed: start.elapsed(),
    })
}

/// QoS 0 PUBLISH packets encoded ahead of time, in writes of about [`WRITE_SIZE`] bytes.
/// A benchmark encodes its flood before the clock starts, so that while it runs the
/// publisher takes no more of the box than the writes: sensors on other machines cost the
/// gateway's box nothing to produce their messages.
pub struct Flood {
    /// Each write with the number of messages it holds.
    writes: Vec<(Bytes, u64)>,
}

impl Flood {
    /// # Errors
    /// When a message cannot be encoded (a topic or payload beyond MQTT's limits).
    pub fn encode(messages: impl Iterator<Item = Planned>) -> Result<Self, PublishError> {
        let mut writes = Vec::new();
        let mut buffer = BytesMut::with_capacity(WRITE_SIZE);
        let mut pending = 0u64;
        for (encoded, message) in (0u64..).zip(messages) {
            encode(message, &mut buffer, encoded)?;
            pending += 1;
            if buffer.len() >= WRITE_SIZE {
                writes.push((buffer.split().freeze(), std::mem::take(&mut pending)));
            }
        }
        if pending > 0 {
            writes.push((buffer.freeze(), pending));
        }
        Ok(Self { writes })
    }

    pub fn messages(&self) -> u64 {
        self.writes.iter().map(|(_, n)| n).sum()
    }
}

/// Publishes a [`Flood`] at QoS 0 as fast as the broker reads it.
///
/// # Errors
/// When the broker cannot be reached or the connection drops.
pub async fn flood(
    host: &str,
    port: u16,
    client_id: &str,
    flood: &Flood,
) -> Result<PublishReport, PublishError> {
    let mut stream = connect_raw(host, port, client_id).await?;
    let start = Instant::now();
    let mut published = 0u64;
    for (write, messages) in &flood.writes {
        stream
            .write_all(write)
            .await
            .map_err(|err| PublishError::Lost {
                sent: published,
                error: err.to_string(),
            })?;
        published += messages;
    }
    disconnect(stream).await;
    Ok(PublishReport {
        published,
        elapsed: start.elapsed(),
    })
}

/// An MQTT session on a plain TCP stream, for publishing at QoS 0: CONNECT, then the
/// CONNACK.
async fn connect_raw(host: &str, port: u16, client_id: &str) -> Result<TcpStream, PublishError> {
    let address = format!("{host}:{port}");
    let refused = |error: String| PublishError::Connect(address.clone(), error);
    let mut stream = TcpStream::connect((host, port))
        .await
        .map_err(|err| refused(err.to_string()))?;
    let mut buffer = BytesMut::with_capacity(4096);
    let mut connect = Connect::new(client_id);
    // No keep-alive: a publisher that only writes has no reader for PINGRESP, and the
    // broker then never drops it for a pause in a paced run.
    connect.keep_alive = 0;
    connect
        .write(&mut buffer)
        .map_err(|err| refused(err.to_string()))?;
    stream
        .write_all(&buffer)
        .await
        .map_err(|err| refused(err.to_string()))?;
    buffer.clear();
    loop {
        match Packet::read(&mut buffer, 1 << 20) {
            Ok(Packet::ConnAck(ack)) if ack.code == ConnectReturnCode::Success => {
                return Ok(stream);
            }
            Ok(Packet::ConnAck(ack)) => return Err(refused(format!("refused: {:?}", ack.code))),
            Ok(other) => return Err(refused(format!("expected CONNACK, got {other:?}"))),
            Err(rumqttc::Error::InsufficientBytes(_)) => {}
            Err(err) => return Err(refused(err.to_string())),
        }
        if stream
            .read_buf(&mut buffer)
            .await
            .map_err(|err| refused(err.to_string()))?
            == 0
        {
            return Err(refused("the broker closed the connection".into()));
        }
    }
}

/// DISCONNECT, so the broker closes the session cleanly; what it has read it delivers.
async fn disconnect(mut stream: TcpStream) {
    let _ = stream.write_all(&[0xE0, 0x00]).await;
    let _ = stream.shutdown().await;
}

/// Appends one QoS 0 PUBLISH; `sent` counts the messages before it, for the error.
fn encode(message: Planned, buffer: &mut BytesMut, sent: u64) -> Result<(), PublishError> {
    Publish::new(message.topic, QoS::AtMostOnce, message.payload)
        .write(buffer)
        .map(drop)
        .map_err(|err| PublishError::Lost {
            sent,
            error: err.to_string(),
        })
}

/// The most the QoS 0 publisher encodes before it writes.
const WRITE_SIZE: usize = 16 * 1024;

/// Writes the encoded publishes in `buffer` and counts them as published.
async fn write_pending(
    stream: &mut TcpStream,
    buffer: &mut BytesMut,
    published: &mut u64,
    pending: &mut u64,
) -> Result<(), PublishError> {
    if buffer.is_empty() {
        return Ok(());
    }
    stream
        .write_all(buffer)
        .await
        .map_err(|err| PublishError::Lost {
            sent: *published,
            error: err.to_string(),
        })?;
    buffer.clear();
    *published += std::mem::take(pending);
    Ok(())
}

/// QoS 1 and 2 through rumqttc, which keeps the in-flight window and answers the broker.
async fn acknowledged(
    host: &str,
    port: u16,
    client_id: &str,
    messages: impl Iterator<Item = Planned>,
    pace: Pace,
    qos: QoS,
    cancel: CancellationToken,
) -> Result<PublishReport, PublishError> {
    let mut options = MqttOptions::new(client_id, host, port);
    options
        .set_keep_alive(Duration::from_secs(30))
        .set_max_packet_size(1 << 20, 1 << 20)
        .set_inflight(1000);
    let (client, mut eventloop) = AsyncClient::new(options, 1000);
    // Connect first, so a missing broker is an error rather than a hang.
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => break,
            Ok(_) => {}
            Err(err) => {
                return Err(PublishError::Connect(
                    format!("{host}:{port}"),
                    err.to_string(),
                ));
            }
        }
    }
    // The event loop runs on its own task; it counts what the broker acknowledged, so the
    // publisher can wait for that before it disconnects (rumqttc drops what is still queued).
    let progress = Arc::new(Progress::default());
    let counts = progress.clone();
    let mut driver = tokio::spawn(async move {
        let mut sent = 0u64;
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(_))) => sent += 1,
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => counts.ack(),
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => {}
                Err(err) => {
                    return Err(PublishError::Lost {
                        sent,
                        error: err.to_string(),
                    });
                }
            }
        }
    });
    let start = Instant::now();
    let mut pacer = Pacer::new(pace);
    let mut published = 0u64;
    for message in messages {
        if cancel.is_cancelled() {
            break;
        }
        pacer.ready().await;
        if client
            .publish(message.topic, qos, false, message.payload)
            .await
            .is_err()
        {
            break;
        }
        published += 1;
    }
    tokio::select! {
        () = progress.acked(published) => {}
        ended = &mut driver => {
            return Err(match ended {
                Ok(Err(err)) => err,
                _ => PublishError::Lost {
                    sent: published,
                    error: "event loop ended".into(),
                },
            });
        }
    }
    let _ = client.disconnect().await;
    match driver.await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => return Err(err),
        Err(join) => {
            return Err(PublishError::Lost {
                sent: published,
                error: join.to_string(),
            });
        }
    }
    Ok(PublishReport {
        published,
        elapsed: start.elapsed(),
    })
}

/// When the next message may go, at a [`Pace`].
struct Pacer {
    /// Messages per 10 ms tick; none for [`Pace::Unlimited`].
    per_tick: f64,
    /// The credit a tick must reach before a burst goes.
    burst: f64,
    credit: f64,
    /// Whether a burst is going out.
    draining: bool,
    ticker: tokio::time::Interval,
}

impl Pacer {
    const TICK: Duration = Duration::from_millis(10);

    fn new(pace: Pace) -> Self {
        let (rate, burst) = match pace {
            Pace::Unlimited => (0.0, 1.0),
            Pace::Steady(rate) => (rate, 1.0),
            Pace::Bursts { rate, size } => (rate, f64::from(size.max(1))),
        };
        let mut ticker = tokio::time::interval(Self::TICK);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        Self {
            per_tick: rate * Self::TICK.as_secs_f64(),
            burst,
            credit: 0.0,
            draining: false,
            ticker,
        }
    }

    /// Until one more message may go.
    async fn ready(&mut self) {
        std::future::poll_fn(|cx| self.poll_ready(cx)).await;
    }

    /// Whether one more message may go now, without waiting.
    fn try_ready(&mut self) -> bool {
        self.poll_ready(&mut Context::from_waker(Waker::noop()))
            .is_ready()
    }

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        if self.per_tick <= 0.0 {
            return Poll::Ready(());
        }
        loop {
            if self.draining && self.credit >= 1.0 {
                self.credit -= 1.0;
                return Poll::Ready(());
            }
            self.draining = false;
            if self.ticker.poll_tick(cx).is_pending() {
                return Poll::Pending;
            }
            self.credit += self.per_tick;
            self.draining = self.credit >= self.burst;
        }
    }
}

/// What the broker has acknowledged, shared with the publisher without a wake-up per
/// packet: the event loop wakes it once, when the count it waits for is reached.
struct Progress {
    acked: AtomicU64,
    /// The count the publisher waits for, once it has queued everything; until then none.
    target: AtomicU64,
    reached: Notify,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            acked: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            reached: Notify::new(),
        }
    }
}

impl Progress {
    fn ack(&self) {
        // Sequentially consistent with `acked`: either this sees the target or the publisher
        // sees this count.
        let now = self.acked.fetch_add(1, Ordering::SeqCst) + 1;
        if now >= self.target.load(Ordering::SeqCst) {
            self.reached.notify_one();
        }
    }

    /// Until the broker has acknowledged `target` publishes.
    async fn acked(&self, target: u64) {
        self.target.store(target, Ordering::SeqCst);
        while self.acked.load(Ordering::SeqCst) < target {
            self.reached.notified().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpListener;

    use super::*;
    use crate::plan::{Format, Scenario};

    fn scenario(messages: u64) -> Scenario {
        Scenario {
            devices: 1,
            messages_per_device: messages,
            format: Format::Value,
            topic_prefix: "t".into(),
            fault_every: 0,
            start_ms: 0,
            period_ms: 1000,
        }
    }

    fn plan(messages: u64) -> impl Iterator<Item = Planned> {
        scenario(messages)
            .messages()
            .collect::<Vec<_>>()
            .into_iter()
    }

    /// A broker stand-in that answers CONNECT with `code`, then reads `keep` bytes and hangs up.
    async fn fake_broker(code: u8, keep: usize) -> (u16, tokio::task::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let served = tokio::spawn(async move {
            let (mut socket, _) = listener.accept().await.unwrap();
            let mut received = BytesMut::new();
            while !matches!(
                Packet::read(&mut received.clone(), 1 << 20),
                Ok(Packet::Connect(..))
            ) {
                socket.read_buf(&mut received).await.unwrap();
            }
            socket.write_all(&[0x20, 0x02, 0x00, code]).await.unwrap();
            received.clear();
            while received.len() < keep && socket.read_buf(&mut received).await.unwrap() > 0 {}
            received.to_vec()
        });
        (port, served)
    }

    /// How many messages `pacer` lets go now, without waiting.
    fn ready_now(pacer: &mut Pacer) -> usize {
        (0..1000).take_while(|_| pacer.try_ready()).count()
    }

    #[tokio::test(start_paused = true)]
    async fn a_steady_pace_lets_a_ticks_worth_go_at_once_then_waits_for_the_next_tick() {
        // 1000 messages per second: 10 per 10 ms tick.
        let mut pacer = Pacer::new(Pace::Steady(1000.0));
        assert_eq!(ready_now(&mut pacer), 10);
        let waited = tokio::time::Instant::now();
        pacer.ready().await;
        assert_eq!(waited.elapsed(), Pacer::TICK);
        assert_eq!(ready_now(&mut pacer), 9);
        tokio::time::advance(Pacer::TICK * 3).await;
        // Ticks missed while the publisher was busy are made up at once.
        assert_eq!(ready_now(&mut pacer), 30);
        assert_eq!(ready_now(&mut Pacer::new(Pace::Unlimited)), 1000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_pace_saves_up_credit_and_lets_a_whole_burst_go() {
        // 1000 messages per second in bursts of at least 25: 10 of credit per tick, and
        // everything saved goes once the credit reaches 25.
        let mut pacer = Pacer::new(Pace::Bursts {
            rate: 1000.0,
            size: 25,
        });
        assert_eq!(ready_now(&mut pacer), 0);
        tokio::time::advance(Pacer::TICK * 2).await;
        assert_eq!(ready_now(&mut pacer), 30);
        tokio::time::advance(Pacer::TICK).await;
        assert_eq!(ready_now(&mut pacer), 0);
        tokio::time::advance(Pacer::TICK).await;
        assert_eq!(ready_now(&mut pacer), 0);
        tokio::time::advance(Pacer::TICK).await;
        assert_eq!(ready_now(&mut pacer), 30);
    }

    /// Reads the PUBLISH packets of `plan(n)` and then a DISCONNECT from what a fake broker
    /// received.
    fn assert_publishes_then_disconnect(served: &[u8], n: u64) {
        let mut received = BytesMut::from(served);
        for want in plan(n) {
            let Ok(Packet::Publish(publish)) = Packet::read(&mut received, 1 << 20) else {
                panic!("expected a PUBLISH");
            };
            assert_eq!(
                (
                    publish.topic.as_ref(),
                    publish.payload.as_ref(),
                    publish.qos
                ),
                (
                    want.topic.as_bytes(),
                    want.payload.as_slice(),
                    QoS::AtMostOnce
                )
            );
        }
        assert!(matches!(
            Packet::read(&mut received, 1 << 20),
            Ok(Packet::Disconnect)
        ));
    }

    #[tokio::test]
    async fn at_qos_0_every_message_is_one_publish_packet_followed_by_disconnect() {
        let (port, served) = fake_broker(0, usize::MAX).await;
        let report = publish(
            "127.0.0.1",
            port,
            "p",
            plan(3),
            Pace::Unlimited,
            0,
            CancellationToken::new(),
        )
        .await
        .unwrap();
        assert_eq!(report.published, 3);
        assert_publishes_then_disconnect(&served.await.unwrap(), 3);
    }

    #[tokio::test]
    async fn a_flood_encoded_ahead_sends_the_same_packets_in_few_writes() {
        // Enough messages for several writes, the last one partial.
        let n = 1000;
        let load = Flood::encode(plan(n)).unwrap();
        assert_eq!(load.messages(), n);
        assert!(load.writes.len() > 1);
        assert!(
            load.writes
                .iter()
                .all(|(write, _)| write.len() < 2 * WRITE_SIZE)
        );
        let (port, served) = fake_broker(0, usize::MAX).await;
        let report = flood("127.0.0.1", port, "p", &load).await.unwrap();
        assert_eq!(report.published, n);
        assert_publishes_then_disconnect(&served.await.unwrap(), n);
    }

    #[tokio::test]
    async fn at_qos_0_a_refused_connect_and_a_lost_broker_are_errors() {
        let (port, _served) = fake_broker(5, 0).await;
        let refused = publish(
            "127.0.0.1",
            port,
            "p",
            plan(1),
            Pace::Unlimited,
            0,
            CancellationToken::new(),
        )
        .await;
        assert!(
            matches!(&refused, Err(PublishError::Connect(_, error)) if error.contains("NotAuthorized")),
            "{refused:?}"
        );
        // The broker hangs up after the CONNACK: writes fail once the kernel notices. The
        // plan is lazy, so only what goes out before that is built.
        let (port, _served) = fake_broker(0, 0).await;
        let lost_scenario = scenario(100_000);
        let lost = publish(
            "127.0.0.1",
            port,
            "p",
            lost_scenario.messages(),
            Pace::Unlimited,
            0,
            CancellationToken::new(),
        )
        .await;
        assert!(matches!(lost, Err(PublishError::Lost { .. })), "{lost:?}");
    }

    #[tokio::test]
    async fn nothing_listening_is_a_connect_error() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        for qos in [0, 1] {
            let result = publish(
                "127.0.0.1",
                port,
                "p",
                plan(1),
                Pace::Unlimited,
                qos,
                CancellationToken::new(),
            )
            .await;
            assert!(
                matches!(result, Err(PublishError::Connect(..))),
                "QoS {qos}: {result:?}"
            );
        }
    }
}
