//! MQTT: one session per broker, a router, and one task per device.
//!
//! The session owns rumqttc's event loop. It subscribes every device's topic at QoS 1 (or as
//! configured) on a persistent session with manual acknowledgements, records each publish in
//! an [`AckWindow`], and hands it to the device task whose filter matches. The writer settles
//! the publish's ticket after commit; the session then acknowledges, in arrival order.
//!
//! The session polls the event loop while the pipeline is full (so keep-alives and
//! acknowledgements still flow) until `max_unacked` messages wait; beyond that it stops
//! reading and TCP pushes back on the broker.
//!
//! rumqttc reaches the broker through [`relay`], which cuts every publish over the broker's
//! `max_payload` ([`oversize`]); the session stores those as `too_large` rejections.

mod guard;
mod oversize;
mod relay;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::{AsyncClient, ConnectionError, Event, MqttOptions, Packet, Publish, QoS, Transport};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use self::relay::Relay;
use super::ack::AckWindow;
use super::backoff::Backoff;
use super::{Outlet, SourceContext};
use crate::config::{BrokerConfig, MqttDeviceConfig};
use crate::decode::Decoder;
use crate::pipeline::RECV_BURST;
use crate::reading::{
    Bytes, DeviceId, DeviceState, Message, Millis, RejectReason, Rejection, Settle, SourceEvent,
    StatusChange, Ticket, now_millis,
};
use crate::telemetry::BrokerGauges;

/// How long a session waits before reading the socket again when the last read found it
/// all but empty. Reading whatever trickled in costs a wake-up, system calls and the
/// kernel's TCP work for a few messages each time; waiting lets one read take a socket's
/// worth. At full QoS 0 rate it cut the gateway's CPU per message by 7 % (4.30 to 4.00 µs,
/// `cargo bench --bench ingest`). It adds at most this much latency, against a flush
/// interval of 100 ms.
const READ_PAUSE: Duration = Duration::from_millis(2);

/// The broker connection as device tasks see it.
#[derive(Clone, Debug, PartialEq)]
enum Link {
    Connecting,
    Up,
    Down(String),
}

/// One publish on its way to a device task.
struct Delivery {
    topic: Arc<str>,
    payload: Bytes,
    received_at: Millis,
    ticket: Option<Ticket>,
    /// The payload's size when it was over `max_payload` and only its first bytes are
    /// here: it goes to the pipeline as a `too_large` rejection, not to its device.
    cut: Option<usize>,
}

struct Route {
    device: DeviceId,
    filter: Arc<str>,
    qos: QoS,
    inbox: mpsc::Sender<Delivery>,
}

/// A device's place in a session's routing; `inbox` is `None` to keep the task the session
/// already routes to.
pub(super) struct RouteSpec {
    device: DeviceId,
    filter: Arc<str>,
    qos: QoS,
    inbox: Option<mpsc::Sender<Delivery>>,
}

/// A message sent to a running session.
pub(super) enum Command {
    /// The complete set of routes from now on, in config order: subscribe what is new,
    /// unsubscribe what is gone, drop the inboxes of devices no longer listed.
    Routes(Vec<RouteSpec>),
}

/// The acknowledgement window shared by the session (which acknowledges) and the writer
/// (which settles tickets after commit).
#[derive(Default)]
struct AckBoard {
    window: Mutex<AckWindow<Publish>>,
    ready: Notify,
    /// A ticket of the current connection was dropped unsettled: no later message of this
    /// connection can be acknowledged in order, so the session reconnects.
    abandoned: AtomicBool,
}

impl Settle for AckBoard {
    fn settle(&self, generation: u64, seq: u64) {
        let front_ready = lock(&self.window).settle(generation, seq);
        if front_ready {
            self.ready.notify_one();
        }
    }

    fn abandon(&self, generation: u64, _seq: u64) {
        if lock(&self.window).generation() == generation {
            self.abandoned.store(true, Ordering::Relaxed);
            self.ready.notify_one();
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a panic while holding it; the window itself stays consistent
    // because every method completes its update before returning.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A running broker session with its device tasks, as the source supervisor holds it.
pub(super) struct BrokerUnit {
    pub config: BrokerConfig,
    pub devices: Vec<MqttDeviceConfig>,
    commands: mpsc::Sender<Command>,
    link: watch::Receiver<Link>,
    cancel: CancellationToken,
    done: TaskTracker,
}

impl BrokerUnit {
    /// Starts the broker's session task and its devices' tasks.
    pub fn start(
        broker: BrokerConfig,
        devices: Vec<MqttDeviceConfig>,
        ctx: &SourceContext,
    ) -> Self {
        let (link_tx, link) = watch::channel(Link::Connecting);
        let (commands, command_rx) = mpsc::channel(4);
        let cancel = ctx.shutdown.child_token();
        let done = TaskTracker::new();
        let mut unit = Self {
            config: broker,
            devices: Vec::new(),
            commands,
            link,
            cancel,
            done,
        };
        let routes = unit.spawn_devices(&devices, ctx);
        unit.devices = devices;
        let relay = match Relay::start(&unit.config) {
            Ok((relay, task)) => {
                ctx.tracker.spawn(unit.done.track_future(task));
                relay
            }
            Err(err) => {
                tracing::error!(broker = %unit.config.id, error = %err, "Broker relay not started; session not started");
                link_tx.send_replace(Link::Down(format!("cannot start the relay: {err}")));
                return unit;
            }
        };
        let session = Session {
            relay,
            gauges: ctx.telemetry.broker(&unit.config.id),
            broker: unit.config.clone(),
            unsent: VecDeque::new(),
            router: Router::new(routes.iter().map(|r| &*r.filter)),
            routes,
            generation: 0,
            subscribing: VecDeque::new(),
            connected: false,
            commands: command_rx,
            events: Some(ctx.events.clone()),
            link: link_tx,
            board: Arc::new(AckBoard::default()),
            unacked_bytes: UnackedBytes::default(),
        };
        ctx.tracker
            .spawn(unit.done.track_future(session.run(unit.cancel.clone())));
        unit
    }

    /// Starts a task for each of `devices`; returns their routes.
    fn spawn_devices(&self, devices: &[MqttDeviceConfig], ctx: &SourceContext) -> Vec<Route> {
        let mut routes = Vec::new();
        for device in devices {
            let id = DeviceId::new(&device.id);
            let Some(decoder) =
                super::decoder_for(&id, &device.format_options(), &device.metrics, &ctx.limits)
            else {
                continue;
            };
            let (inbox, inbox_rx) = mpsc::channel(ctx.pipeline.device_queue);
            routes.push(Route {
                device: id.clone(),
                filter: Arc::from(device.topic.as_str()),
                qos: qos(device.qos),
                inbox,
            });
            let task = DeviceTask {
                outlet: Outlet::new(
                    ctx.events.clone(),
                    ctx.pipeline.overflow,
                    ctx.telemetry.source(&id),
                ),
                id,
                broker: self.config.id.clone(),
                decoder,
                expected_interval: device.expected_interval,
            };
            ctx.tracker.spawn(
                self.done
                    .track_future(task.run(inbox_rx, self.link.clone())),
            );
        }
        routes
    }

    /// Takes a reloaded list of this broker's devices without touching the connection:
    /// unchanged devices keep their tasks, added and changed ones get new tasks, removed ones
    /// end once their inbox drains. Returns the ids started anew.
    pub async fn update(
        &mut self,
        devices: Vec<MqttDeviceConfig>,
        ctx: &SourceContext,
    ) -> Vec<DeviceId> {
        let fresh: Vec<MqttDeviceConfig> = devices
            .iter()
            .filter(|d| !self.devices.iter().any(|old| super::same_mqtt(old, d)))
            .cloned()
            .collect();
        let mut started: Vec<Route> = self.spawn_devices(&fresh, ctx);
        let specs = devices
            .iter()
            .filter_map(|d| {
                let device = DeviceId::new(&d.id);
                let inbox = match started.iter().position(|r| r.device == device) {
                    Some(i) => Some(started.swap_remove(i).inbox),
                    None if fresh.iter().any(|f| f.id == d.id) => return None,
                    None => None,
                };
                Some(RouteSpec {
                    device,
                    filter: Arc::from(d.topic.as_str()),
                    qos: qos(d.qos),
                    inbox,
                })
            })
            .collect();
        // A session that has ended has dropped every route already.
        let _ = self.commands.send(Command::Routes(specs)).await;
        self.devices = devices;
        fresh.iter().map(|d| DeviceId::new(&d.id)).collect()
    }

    /// Closes the session (acknowledging what was committed) and waits for its tasks.
    pub async fn stop(self) {
        self.cancel.cancel();
        self.done.close();
        self.done.wait().await;
    }
}

fn qos(level: u8) -> QoS {
    match level {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

struct Session {
    broker: BrokerConfig,
    /// What rumqttc connects to; it opens the broker connection (see relay.rs).
    relay: Relay,
    /// Connection state and unacknowledged messages, for `/metrics`.
    gauges: Arc<BrokerGauges>,
    /// Acknowledgements due, written at the top of the next loop turn.
    unsent: VecDeque<Publish>,
    router: Router,
    routes: Vec<Route>,
    /// Bumped when the routes change, so a delivery routed before is routed again.
    generation: u64,
    /// The filters of each subscribe request not yet answered, in order: SubAcks name no
    /// filters.
    subscribing: VecDeque<Vec<Arc<str>>>,
    /// Between a ConnAck and the next connection error.
    connected: bool,
    commands: mpsc::Receiver<Command>,
    /// For publishes no device claims; dropped at shutdown like the routes.
    events: Option<mpsc::Sender<SourceEvent>>,
    link: watch::Sender<Link>,
    board: Arc<AckBoard>,
    /// The payload bytes of the messages in the window, bounded by `max_unacked_bytes`.
    unacked_bytes: UnackedBytes,
}

/// The payload sizes of the messages waiting for their acknowledgement, in arrival order
/// (the window's), and their sum.
#[derive(Debug, Default)]
struct UnackedBytes {
    sizes: VecDeque<usize>,
    total: usize,
}

impl UnackedBytes {
    fn push(&mut self, size: usize) {
        self.sizes.push_back(size);
        self.total += size;
    }

    /// The oldest message was acknowledged.
    fn pop(&mut self) {
        self.total -= self.sizes.pop_front().unwrap_or(0);
    }
}

impl Session {
    async fn run(mut self, cancel: CancellationToken) {
        let keep_alive = self.broker.keep_alive.max(Duration::from_secs(1));
        // rumqttc connects to the relay, which opens the broker connection (see relay.rs).
        let mut options = MqttOptions::new(&self.broker.client_id, self.relay.path(), 0);
        options
            .set_transport(Transport::Unix)
            .set_keep_alive(keep_alive)
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(relay::max_packet(self.broker.max_payload), 1 << 20);
        if let (Some(user), Some(pass)) = (&self.broker.username, &self.broker.password) {
            options.set_credentials(user, pass.expose());
        }
        let max_unacked = usize::from(self.broker.max_unacked);
        // Only subscriptions and the disconnect go through rumqttc's request channel.
        let (client, mut eventloop) = AsyncClient::new(options, 64);
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut backoff = Backoff::new(Duration::from_millis(200), self.broker.reconnect_max);
        let mut stopping = false;
        let mut last_poll = Instant::now();
        // What the current connection's guard cut, and the publishes it has brought so far.
        let mut cuts = self.relay.cuts();
        let mut publishes: u64 = 0;
        // When the last read of the socket found only a few messages, the next waits until
        // this, so more gather (see READ_PAUSE).
        let mut read_at = Instant::now();
        // When the last read from the socket returned: the receive time of every publish
        // it brought, including those rumqttc parsed from it and hands out later.
        let mut read_received_at = now_millis();
        // The most publishes one read has brought: what a read takes when more are waiting.
        let mut full_burst = 1;

        loop {
            if self.board.abandoned.swap(false, Ordering::Relaxed) {
                tracing::error!(broker = %self.broker.id, "A message was dropped inside the gateway before it was stored; reconnecting so the broker delivers it again");
                self.reset_window();
                self.unsent.clear();
                eventloop.clean();
                eventloop.state.events.clear();
                eventloop.network = None;
                self.link.send_replace(Link::Connecting);
            }
            self.collect_acks();
            if let Err(err) = self.send_acks(&mut eventloop).await {
                // The next poll reports the broken connection and reconnects.
                tracing::debug!(broker = %self.broker.id, error = %err, "Acknowledgements not sent");
                self.unsent.clear();
            }
            forward_ready(
                &self.routes,
                &self.router,
                self.generation,
                self.events.as_ref(),
                &mut pending,
                self.broker.max_payload,
            );
            if stopping && pending.is_empty() {
                self.close_inputs();
            }
            let window_len = lock(&self.board.window).len();
            let unacked = window_len + self.unsent.len();
            self.gauges.unacked.store(unacked, Ordering::Relaxed);
            if stopping && unacked == 0 && pending.is_empty() {
                break;
            }
            let can_poll = !stopping || unacked > 0;
            // Stop reading once max_unacked messages wait for their commit, and let TCP push
            // back on the broker.
            let full = pending.len() >= max_unacked
                || window_len >= max_unacked
                || self.unacked_bytes.total >= self.broker.max_unacked_bytes;
            // A stalled pipeline must not cost the connection: while the window is full, a
            // ping goes out every half keep-alive (the broker keeps what it cannot send).
            let ping_due = last_poll + keep_alive / 2;
            let now = Instant::now();
            let buffered = !eventloop.state.events.is_empty();
            let pause = (!buffered && !stopping && now < read_at).then_some(read_at);
            let next = next_step(can_poll, full, pause, ping_due, now);
            let event = if next == Next::Ping {
                last_poll = now;
                match ping(&mut eventloop).await {
                    Ok(()) => None,
                    // A poll reports the broken connection and reconnects.
                    Err(_) => Some(eventloop.poll().await),
                }
            } else if next == Next::Poll {
                last_poll = now;
                let poll = eventloop.poll();
                tokio::pin!(poll);
                loop {
                    tokio::select! {
                        biased;
                        () = cancel.cancelled(), if !stopping => {
                            stopping = true;
                        }
                        // Commits settled messages: leave the poll to acknowledge them.
                        () = self.board.ready.notified() => break None,
                        Some(command) = self.commands.recv(), if !stopping => {
                            self.command(&client, command);
                        }
                        sent = forward(&self.routes, &self.router, self.generation, self.events.as_ref(), &mut pending, self.broker.max_payload), if !pending.is_empty() => {
                            if !sent { pending.pop_front(); }
                        }
                        event = &mut poll => break Some(event),
                    }
                    if stopping && pending.is_empty() {
                        self.close_inputs();
                        if self.unsent.is_empty() && lock(&self.board.window).is_empty() {
                            break None;
                        }
                    }
                }
            } else {
                tokio::select! {
                    biased;
                    () = cancel.cancelled(), if !stopping => stopping = true,
                    () = self.board.ready.notified() => {}
                    Some(command) = self.commands.recv(), if !stopping => {
                        self.command(&client, command);
                        // Subscriptions go out with the next poll: no pause before it.
                        read_at = Instant::now();
                    }
                    sent = forward(&self.routes, &self.router, self.generation, self.events.as_ref(), &mut pending, self.broker.max_payload), if !pending.is_empty() => {
                        if !sent { pending.pop_front(); }
                    }
                    () = tokio::time::sleep(Duration::from_millis(200)), if stopping => {}
                    () = super::sleep_until(next.poll_at()) => {}
                }
                if stopping && pending.is_empty() {
                    self.close_inputs();
                }
                None
            };
            match event {
                None => {}
                Some(Ok(Event::Incoming(Packet::ConnAck(_)))) => {
                    backoff.reset();
                    publishes = 0;
                    cuts = self.relay.cuts();
                    self.reset_window();
                    self.unsent.clear();
                    self.connected = true;
                    self.subscribing.clear();
                    if !stopping {
                        let all: Vec<(Arc<str>, QoS)> = self
                            .routes
                            .iter()
                            .map(|r| (r.filter.clone(), r.qos))
                            .collect();
                        self.subscribe(&client, all);
                        read_at = Instant::now();
                    }
                    tracing::info!(broker = %self.broker.id, "Broker connected");
                }
                // After the stop, new publishes stay unacknowledged: the broker keeps them.
                Some(Ok(Event::Incoming(Packet::Publish(publish)))) if !stopping => {
                    // rumqttc takes a fixed number of packets per read (9 in 0.25):
                    // fewer means the socket had no more, and reading again at once would
                    // find only a few.
                    if !buffered {
                        read_received_at = now_millis();
                        // Packets this read brought; events rumqttc queued itself (a
                        // PubComp answering a PubRel) were not read.
                        let burst = 1 + eventloop
                            .state
                            .events
                            .iter()
                            .filter(|e| matches!(e, Event::Incoming(_)))
                            .count();
                        full_burst = full_burst.max(burst);
                        if burst < full_burst {
                            read_at = Instant::now() + READ_PAUSE;
                        }
                    }
                    let cut = cuts.take(publishes);
                    publishes += 1;
                    self.receive(publish, read_received_at, cut, &mut pending);
                    // The rest of this read, parsed already, is taken now rather than one
                    // loop turn each, as far as max_unacked allows.
                    let mut unacked = window_len + 1;
                    while pending.len() < max_unacked
                        && unacked < max_unacked
                        && matches!(
                            eventloop.state.events.front(),
                            Some(Event::Incoming(Packet::Publish(_)))
                        )
                    {
                        if let Some(Event::Incoming(Packet::Publish(publish))) =
                            eventloop.state.events.pop_front()
                        {
                            let cut = cuts.take(publishes);
                            publishes += 1;
                            self.receive(publish, read_received_at, cut, &mut pending);
                            unacked += 1;
                        }
                    }
                }
                Some(Ok(Event::Incoming(Packet::SubAck(ack)))) => {
                    let filters = self.subscribing.pop_front().unwrap_or_default();
                    let refused: Vec<&str> = ack
                        .return_codes
                        .iter()
                        .zip(&filters)
                        .filter(|(code, _)| matches!(code, rumqttc::SubscribeReasonCode::Failure))
                        .map(|(_, filter)| &**filter)
                        .collect();
                    if refused.is_empty() {
                        tracing::info!(broker = %self.broker.id, topics = filters.len(), "Subscribed");
                        self.gauges.connected.store(true, Ordering::Relaxed);
                        self.link.send_replace(Link::Up);
                    } else {
                        tracing::error!(broker = %self.broker.id, topics = ?refused, "Broker refused subscriptions; check its ACLs");
                        self.link.send_replace(Link::Down(format!(
                            "subscription refused for {}",
                            refused.join(", ")
                        )));
                    }
                }
                // After the stop: left unacknowledged, the broker keeps it.
                Some(Ok(Event::Incoming(Packet::Publish(_)))) => publishes += 1,
                Some(Ok(_)) => {}
                Some(Err(err)) => {
                    // The broker delivers everything unacknowledged again on the next
                    // connection; settlements from this one no longer count, and publishes
                    // rumqttc read before the error must not surface after the next ConnAck.
                    self.reset_window();
                    self.unsent.clear();
                    eventloop.state.events.clear();
                    self.connected = false;
                    if stopping {
                        break;
                    }
                    self.gauges.connected.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    // Why the relay could not reach the broker says more than what rumqttc
                    // saw of it (a closed stream).
                    let reason = self.relay.take_error().unwrap_or_else(|| describe(&err));
                    tracing::warn!(broker = %self.broker.id, error = %reason, retry_in = ?delay, "Broker connection failed");
                    self.link.send_replace(Link::Down(reason));
                    tokio::select! {
                        () = tokio::time::sleep(delay) => {}
                        () = cancel.cancelled() => stopping = true,
                    }
                }
            }
        }
        self.close_inputs();
        self.gauges.connected.store(false, Ordering::Relaxed);
        // A poll without a connection would open one.
        if eventloop.network.is_some() && client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(event) = eventloop.poll().await {
                    if matches!(event, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        tracing::info!(broker = %self.broker.id, "Broker session closed");
    }

    /// Subscribes `filters`, remembering them to read the SubAck.
    fn subscribe(&mut self, client: &AsyncClient, filters: Vec<(Arc<str>, QoS)>) {
        if filters.is_empty() {
            return;
        }
        let requests = filters
            .iter()
            .map(|(filter, qos)| rumqttc::SubscribeFilter::new(filter.to_string(), *qos));
        match client.try_subscribe_many(requests) {
            Ok(()) => self
                .subscribing
                .push_back(filters.into_iter().map(|(f, _)| f).collect()),
            Err(err) => {
                tracing::error!(broker = %self.broker.id, error = %err, "Could not queue subscriptions")
            }
        }
    }

    fn command(&mut self, client: &AsyncClient, command: Command) {
        match command {
            Command::Routes(specs) => self.reroute(client, specs),
        }
    }

    /// Takes a new set of routes without reconnecting: unchanged devices keep their inboxes,
    /// removed ones lose theirs (their tasks drain and end), new filters are subscribed and
    /// filters no device uses any more unsubscribed.
    fn reroute(&mut self, client: &AsyncClient, specs: Vec<RouteSpec>) {
        let mut old: HashMap<DeviceId, Route> = self
            .routes
            .drain(..)
            .map(|route| (route.device.clone(), route))
            .collect();
        let before: HashMap<Arc<str>, QoS> =
            old.values().map(|r| (r.filter.clone(), r.qos)).collect();
        for spec in specs {
            let inbox = match spec.inbox {
                Some(inbox) => inbox,
                None => match old.remove(&spec.device) {
                    Some(route) => route.inbox,
                    None => continue,
                },
            };
            self.routes.push(Route {
                device: spec.device,
                filter: spec.filter,
                qos: spec.qos,
                inbox,
            });
        }
        let after: HashMap<Arc<str>, QoS> = self
            .routes
            .iter()
            .map(|r| (r.filter.clone(), r.qos))
            .collect();
        self.router = Router::new(self.routes.iter().map(|r| &*r.filter));
        self.generation += 1;
        tracing::info!(broker = %self.broker.id, devices = self.routes.len(), "Routes updated without reconnecting");
        if !self.connected {
            // The next ConnAck subscribes the whole set.
            return;
        }
        let gone: Vec<Arc<str>> = before
            .keys()
            .filter(|f| !after.contains_key(*f))
            .cloned()
            .collect();
        for filter in gone {
            if let Err(err) = client.try_unsubscribe(filter.to_string()) {
                tracing::warn!(broker = %self.broker.id, filter = %filter, error = %err, "Could not queue an unsubscribe");
            }
        }
        let new: Vec<(Arc<str>, QoS)> = after
            .into_iter()
            .filter(|(f, q)| before.get(f) != Some(q))
            .collect();
        self.subscribe(client, new);
    }

    /// Takes a publish in: records it in the acknowledgement window and queues it for its
    /// device; `cut` is its payload's size when the guard cut it.
    fn receive(
        &mut self,
        publish: Publish,
        received_at: Millis,
        cut: Option<usize>,
        pending: &mut VecDeque<Pending>,
    ) {
        let ticket = (publish.qos != QoS::AtMostOnce).then(|| {
            // Only what the acknowledgement needs; the payload travels with the delivery.
            let marker = Publish {
                dup: publish.dup,
                qos: publish.qos,
                retain: publish.retain,
                topic: String::new(),
                pkid: publish.pkid,
                payload: Bytes::new(),
            };
            let (generation, seq) = lock(&self.board.window).push(marker);
            self.unacked_bytes.push(publish.payload.len());
            Ticket::new(self.board.clone(), generation, seq)
        });
        let route = self.router.find(&publish.topic);
        // A publish on an exact filter shares the route's topic string.
        let topic = match route.map(|i| &self.routes[i].filter) {
            Some(filter) if !filter.contains(['+', '#']) => filter.clone(),
            _ => Arc::from(publish.topic.as_str()),
        };
        let payload = publish.payload;
        // A publish no device claims (an overlapping or retained subscription) goes the same
        // way with no route: it is stored as a rejection and acknowledged after commit.
        let delivery = Delivery {
            topic,
            payload,
            received_at,
            ticket,
            cut,
        };
        pending.push_back(Pending {
            generation: self.generation,
            route,
            delivery,
        });
    }

    /// Moves every acknowledgement that is due, in arrival order, out of the window.
    fn collect_acks(&mut self) {
        let mut window = lock(&self.board.window);
        while let Some(publish) = window.pop_ready() {
            self.unacked_bytes.pop();
            self.unsent.push_back(publish);
        }
    }

    /// Forgets every message of the connection that was: the broker sends them again.
    fn reset_window(&mut self) {
        lock(&self.board.window).reset();
        self.unacked_bytes = UnackedBytes::default();
    }

    /// Writes the due acknowledgements straight into the connection, in order, with one
    /// flush. Through rumqttc's request channel they would go out one per poll, behind whole
    /// batches of incoming publishes: under load they pile up, the broker's in-flight window
    /// stays full and delivery stalls.
    ///
    /// # Errors
    /// When the connection is broken; the broker then delivers them again.
    async fn send_acks(
        &mut self,
        eventloop: &mut rumqttc::EventLoop,
    ) -> Result<(), rumqttc::StateError> {
        if self.unsent.is_empty() {
            return Ok(());
        }
        let Some(network) = eventloop.network.as_mut() else {
            // Not connected: the broker delivers these again on the next connection.
            self.unsent.clear();
            return Ok(());
        };
        while let Some(publish) = self.unsent.pop_front() {
            let request = match publish.qos {
                QoS::AtMostOnce => continue,
                QoS::AtLeastOnce => rumqttc::Request::PubAck(rumqttc::PubAck::new(publish.pkid)),
                QoS::ExactlyOnce => rumqttc::Request::PubRec(rumqttc::PubRec::new(publish.pkid)),
            };
            if let Some(packet) = eventloop.state.handle_outgoing_packet(request)? {
                network.write(packet).await?;
            }
        }
        network.flush().await
    }

    /// Drops the senders into device tasks and the pipeline, so they end and drain.
    fn close_inputs(&mut self) {
        self.routes.clear();
        self.events = None;
    }
}

/// A delivery waiting for its device's inbox, routed when it arrived.
struct Pending {
    /// The routes' generation `route` refers to.
    generation: u64,
    route: Option<usize>,
    delivery: Delivery,
}

/// Writes a PINGREQ straight into the connection, past rumqttc's state: it does not wait
/// for the PINGRESP (read with everything else once reading resumes), and rumqttc's own
/// keep-alive, which would, runs only in a poll.
///
/// # Errors
/// When the connection is broken.
async fn ping(eventloop: &mut rumqttc::EventLoop) -> Result<(), rumqttc::StateError> {
    match eventloop.network.as_mut() {
        Some(network) => {
            network.write(Packet::PingReq).await?;
            network.flush().await
        }
        None => Ok(()),
    }
}

/// What the session loop does next.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Next {
    /// Poll the connection: read the socket, send what rumqttc has queued.
    Poll,
    /// Send a keep-alive ping without reading: the window is full, and a poll would take
    /// in publishes rumqttc has read.
    Ping,
    /// Wait for a command, a settlement or room in an inbox, and poll at this time at the
    /// latest (never, when None).
    Wait(Option<Instant>),
}

impl Next {
    fn poll_at(self) -> Option<Instant> {
        match self {
            Self::Poll | Self::Ping => None,
            Self::Wait(at) => at,
        }
    }
}

/// Polls unless there is nothing to poll for (`can_poll` false), or the window is `full`
/// (then it only pings, when a keep-alive ping is due), or a read pause runs until `pause`.
/// A wait always ends after `now`.
fn next_step(
    can_poll: bool,
    full: bool,
    pause: Option<Instant>,
    ping_due: Instant,
    now: Instant,
) -> Next {
    if !can_poll {
        Next::Wait(None)
    } else if full {
        if now >= ping_due {
            Next::Ping
        } else {
            Next::Wait(Some(ping_due))
        }
    } else {
        match pause {
            Some(until) if until > now => Next::Wait(Some(until)),
            _ => Next::Poll,
        }
    }
}

/// Where a delivery goes: its device's inbox or, when no device claims its topic or its
/// payload was cut, the pipeline, as a rejection of the device if there is one.
enum Target<'a> {
    Inbox(&'a mpsc::Sender<Delivery>),
    Pipeline(&'a mpsc::Sender<SourceEvent>, Option<&'a DeviceId>),
}

/// The front delivery's receiver; None when it is gone. A delivery routed before the routes
/// changed is routed again.
fn target<'a>(
    routes: &'a [Route],
    router: &Router,
    generation: u64,
    events: Option<&'a mpsc::Sender<SourceEvent>>,
    front: &mut Pending,
) -> Option<Target<'a>> {
    if front.generation != generation {
        front.route = router.find(&front.delivery.topic);
        front.generation = generation;
    }
    let route = front.route.and_then(|route| routes.get(route));
    match (route, front.delivery.cut) {
        (Some(route), None) => Some(Target::Inbox(&route.inbox)),
        (Some(route), Some(_)) => {
            events.map(|events| Target::Pipeline(events, Some(&route.device)))
        }
        // A delivery routed to a device that is gone is dropped (and delivered again).
        (None, _) if front.route.is_some() => None,
        (None, _) => events.map(|events| Target::Pipeline(events, None)),
    }
}

/// A delivery stored as a rejection: its payload was cut, or no device claims its topic.
fn rejected(delivery: Delivery, device: Option<&DeviceId>, max_payload: usize) -> SourceEvent {
    let mut rejection = match delivery.cut {
        Some(size) => Rejection {
            size,
            ..Rejection::whole(
                device.cloned(),
                delivery.topic.clone(),
                delivery.received_at,
                RejectReason::TooLarge,
                format!(
                    "payload of {size} bytes is larger than the broker's max_payload \
                     ({max_payload} bytes); its first {} bytes are kept",
                    delivery.payload.len()
                ),
                delivery.payload,
            )
        },
        None => Rejection::whole(
            None,
            delivery.topic.clone(),
            delivery.received_at,
            RejectReason::UnknownDevice,
            format!("no device is configured for topic `{}`", delivery.topic),
            delivery.payload,
        ),
    };
    if device.is_none() && delivery.cut.is_some() {
        rejection.detail.push_str(&format!(
            "; no device is configured for topic `{}`",
            rejection.source
        ));
    }
    SourceEvent::Rejected {
        rejection,
        ticket: delivery.ticket,
    }
}

/// Hands over, in order, every delivery whose receiver has room now, without waiting: a
/// read's worth of publishes costs one pass, not a loop turn each. Stops at the first that
/// has to wait; one whose receiver is gone is dropped (its ticket asks for a reconnect).
fn forward_ready(
    routes: &[Route],
    router: &Router,
    generation: u64,
    events: Option<&mpsc::Sender<SourceEvent>>,
    pending: &mut VecDeque<Pending>,
    max_payload: usize,
) {
    use mpsc::error::TrySendError;
    while let Some(front) = pending.front_mut() {
        let room = match target(routes, router, generation, events, front) {
            Some(Target::Inbox(inbox)) => inbox.try_reserve().map(|permit| {
                if let Some(front) = pending.pop_front() {
                    permit.send(front.delivery);
                }
            }),
            Some(Target::Pipeline(events, device)) => events.try_reserve().map(|permit| {
                let device = device.cloned();
                if let Some(front) = pending.pop_front() {
                    permit.send(rejected(front.delivery, device.as_ref(), max_payload));
                }
            }),
            None => Err(TrySendError::Closed(())),
        };
        match room {
            Ok(()) => {}
            Err(TrySendError::Full(())) => return,
            Err(TrySendError::Closed(())) => {
                pending.pop_front();
            }
        }
    }
}

/// Waits for room for the front delivery and hands it over; false when its receiver is
/// gone.
async fn forward(
    routes: &[Route],
    router: &Router,
    generation: u64,
    events: Option<&mpsc::Sender<SourceEvent>>,
    pending: &mut VecDeque<Pending>,
    max_payload: usize,
) -> bool {
    let Some(front) = pending.front_mut() else {
        return true;
    };
    match target(routes, router, generation, events, front) {
        Some(Target::Inbox(inbox)) => {
            let Ok(permit) = inbox.reserve().await else {
                return false;
            };
            if let Some(front) = pending.pop_front() {
                permit.send(front.delivery);
            }
        }
        Some(Target::Pipeline(events, device)) => {
            let device = device.cloned();
            let Ok(permit) = events.reserve().await else {
                return false;
            };
            if let Some(front) = pending.pop_front() {
                permit.send(rejected(front.delivery, device.as_ref(), max_payload));
            }
        }
        None => return false,
    }
    true
}

fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::Io(io) => format!("I/O: {io}"),
        other => other.to_string(),
    }
}

/// Finds the first filter (in config order) that matches a topic: exact filters by hash,
/// wildcard filters by scan, so routing costs the same for 10 devices or 1,000.
struct Router {
    exact: HashMap<String, usize>,
    wildcards: Vec<(usize, String)>,
}

impl Router {
    fn new<'a>(filters: impl Iterator<Item = &'a str>) -> Self {
        let mut exact = HashMap::new();
        let mut wildcards = Vec::new();
        for (i, filter) in filters.enumerate() {
            if filter.contains(['+', '#']) {
                wildcards.push((i, filter.to_string()));
            } else {
                exact.entry(filter.to_string()).or_insert(i);
            }
        }
        Self { exact, wildcards }
    }

    fn find(&self, topic: &str) -> Option<usize> {
        let exact = self.exact.get(topic).copied();
        let wildcard = self
            .wildcards
            .iter()
            .take_while(|(i, _)| exact.is_none_or(|e| *i < e))
            .find(|(_, filter)| topic_matches(filter, topic))
            .map(|(i, _)| *i);
        wildcard.or(exact)
    }
}

/// MQTT topic filter matching (`+` one level, `#` the rest).
pub fn topic_matches(filter: &str, topic: &str) -> bool {
    let mut f = filter.split('/');
    let mut t = topic.split('/');
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return !topic.starts_with('$') || !filter.starts_with(['#', '+']),
            (Some("+"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

/// Decodes one device's publishes and tracks its state.
struct DeviceTask {
    id: DeviceId,
    broker: String,
    decoder: Decoder,
    expected_interval: Option<Duration>,
    outlet: Outlet,
}

impl DeviceTask {
    async fn run(self, mut inbox: mpsc::Receiver<Delivery>, mut link: watch::Receiver<Link>) {
        let mut state = DeviceState::Starting;
        let mut last_seen = Instant::now();
        let mut link_open = true;
        // Whatever waits in the inbox is taken at once: one wake-up per burst.
        let mut deliveries = Vec::new();
        // A device added by a reload joins a session that may be up already.
        if *link.borrow_and_update() == Link::Up {
            state = DeviceState::Connected;
            let status = StatusChange {
                device: self.id.clone(),
                kind: "mqtt",
                state,
                error: None,
                at: now_millis(),
            };
            if !self.outlet.send_event(SourceEvent::Status(status)).await {
                return;
            }
        }
        loop {
            let stale_at = self.expected_interval.map(|i| last_seen + i);
            let next = tokio::select! {
                received = inbox.recv_many(&mut deliveries, RECV_BURST) => {
                    if received == 0 {
                        return;
                    }
                    for delivery in deliveries.drain(..) {
                        let decoded = self.decoder.decode(&delivery.payload, delivery.received_at);
                        let message = Message {
                            device: self.id.clone(),
                            source: delivery.topic,
                            received_at: delivery.received_at,
                            raw: delivery.payload,
                            decoded,
                            ticket: delivery.ticket,
                        };
                        if !self.outlet.send(message).await {
                            return;
                        }
                    }
                    // After the sends: a pipeline that made them wait is no silent device.
                    last_seen = Instant::now();
                    (DeviceState::Connected, None)
                }
                changed = link.changed(), if link_open => {
                    if changed.is_err() {
                        // The session ended; the inbox closes next.
                        link_open = false;
                        continue;
                    }
                    match &*link.borrow_and_update() {
                        Link::Up => {
                            last_seen = Instant::now();
                            (DeviceState::Connected, None)
                        }
                        Link::Down(err) => (DeviceState::Failing, Some(format!("broker {}: {err}", self.broker))),
                        Link::Connecting => (DeviceState::Starting, None),
                    }
                }
                () = super::sleep_until(stale_at), if state == DeviceState::Connected => {
                    let interval = self.expected_interval.unwrap_or_default();
                    (DeviceState::Stale, Some(format!("no message for {}", humantime::format_duration(interval))))
                }
            };
            if next.0 != state {
                state = next.0;
                let status = StatusChange {
                    device: self.id.clone(),
                    kind: "mqtt",
                    state,
                    error: next.1,
                    at: now_millis(),
                };
                if !self.outlet.send_event(SourceEvent::Status(status)).await {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loop never waits for a time already past (it would spin until the time ahead),
    /// and polls whenever nothing holds it back.
    #[test]
    fn the_session_polls_when_it_may_and_waits_only_for_a_time_ahead() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let times = [now - ms(5), now, now + ms(5)];
        let pauses = [None, Some(times[0]), Some(times[1]), Some(times[2])];
        for can_poll in [false, true] {
            for full in [false, true] {
                for pause in pauses {
                    for ping_due in times {
                        let next = next_step(can_poll, full, pause, ping_due, now);
                        let case = format!("{can_poll} {full} {pause:?} {ping_due:?}: {next:?}");
                        let paused = pause.is_some_and(|p| p > now);
                        let expected = match (can_poll, full) {
                            (false, _) => Next::Wait(None),
                            (true, true) if ping_due <= now => Next::Ping,
                            (true, true) => Next::Wait(Some(ping_due)),
                            (true, false) if paused => Next::Wait(pause),
                            (true, false) => Next::Poll,
                        };
                        assert_eq!(next, expected, "{case}");
                        if let Next::Wait(Some(at)) = next {
                            assert!(at > now, "{case}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn a_ticket_dropped_unsettled_asks_for_a_reconnect_only_on_its_own_connection() {
        let board = Arc::new(AckBoard::default());
        let (generation, seq) =
            lock(&board.window).push(Publish::new("t", QoS::AtLeastOnce, vec![]));
        let current = Ticket::new(board.clone(), generation, seq);
        drop(current);
        assert!(board.abandoned.swap(false, Ordering::Relaxed));

        let (generation, seq) =
            lock(&board.window).push(Publish::new("t", QoS::AtLeastOnce, vec![]));
        let stale = Ticket::new(board.clone(), generation, seq);
        lock(&board.window).reset();
        drop(stale);
        assert!(!board.abandoned.load(Ordering::Relaxed));

        let (generation, seq) =
            lock(&board.window).push(Publish::new("t", QoS::AtLeastOnce, vec![]));
        Ticket::new(board.clone(), generation, seq).settle();
        assert!(!board.abandoned.load(Ordering::Relaxed));
        assert!(lock(&board.window).pop_ready().is_some());
    }

    #[test]
    fn router_picks_the_first_matching_filter_in_config_order() {
        let router = Router::new(["a/+", "a/b", "c/d", "#"].into_iter());
        assert_eq!(router.find("a/b"), Some(0));
        assert_eq!(router.find("c/d"), Some(2));
        assert_eq!(router.find("x"), Some(3));
        let exact_first = Router::new(["a/b", "a/+"].into_iter());
        assert_eq!(exact_first.find("a/b"), Some(0));
        assert_eq!(exact_first.find("a/c"), Some(1));
        assert_eq!(Router::new(["a/b"].into_iter()).find("a/c"), None);
    }

    #[test]
    fn topic_filters_match_like_a_broker() {
        assert!(topic_matches("a/b", "a/b"));
        assert!(!topic_matches("a/b", "a/b/c"));
        assert!(topic_matches("a/+/c", "a/x/c"));
        assert!(!topic_matches("a/+/c", "a/x/y"));
        assert!(topic_matches("a/#", "a/x/y"));
        assert!(topic_matches("a/#", "a"));
        assert!(topic_matches("#", "anything/at/all"));
        assert!(!topic_matches("#", "$SYS/x"));
        assert!(!topic_matches("a/b", "a"));
    }
}
