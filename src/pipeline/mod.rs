//! The pipeline between sources and the writer: validate, then aggregate into batches.
//!
//! ```text
//! sources ──SourceEvent──► validate ──Stage──► aggregate ──Batch──► writer
//! ```
//!
//! Every channel is bounded. Stages never see the shutdown signal: each ends when its input
//! closes and closes its output in turn, so a stop drains front to back.

pub mod aggregate;
pub mod validate;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::Config;
use crate::reading::{DeviceId, FaultCounts, Millis, SourceEvent, StatusChange, Ticket};
use crate::storage::Batch;
use aggregate::Batcher;
use validate::{Checked, Validator};

/// The most events a stage (or a device task) takes from its input in one wake-up.
pub(crate) const RECV_BURST: usize = 256;

/// Sends into a bounded channel, waiting only when it is full: with room, `try_send` costs
/// no future and no semaphore waiter, and most sends find room. False when the receiver is
/// gone.
pub(crate) async fn send<T>(channel: &mpsc::Sender<T>, value: T) -> bool {
    match channel.try_send(value) {
        Ok(()) => true,
        Err(mpsc::error::TrySendError::Full(value)) => channel.send(value).await.is_ok(),
        Err(mpsc::error::TrySendError::Closed(_)) => false,
    }
}

/// What validation hands to aggregation.
#[derive(Debug)]
pub enum Stage {
    Message {
        device: DeviceId,
        checked: Checked,
        ticket: Option<Ticket>,
    },
    Status(StatusChange),
    Faults {
        device: DeviceId,
        counts: FaultCounts,
    },
    Heartbeat(Millis),
    /// A reloaded config: the writer registers added devices and retires removed ones.
    Reconfigure(Arc<Config>),
}

/// A reloaded config for the pipeline. Validation applies it between two events and then
/// answers on `applied`; sources of new devices start only after that, so their first
/// message meets rules that know them.
pub struct Reconfigure {
    pub config: Arc<Config>,
    pub applied: oneshot::Sender<()>,
}

/// Validates every event from the sources until they all hang up, taking reloaded configs
/// from `control` in between.
pub async fn validate(
    mut validator: Validator,
    mut input: mpsc::Receiver<SourceEvent>,
    mut control: mpsc::Receiver<Reconfigure>,
    output: mpsc::Sender<Stage>,
) {
    // Taking whatever is queued at once costs one wake-up per burst, not per message.
    let mut events = Vec::with_capacity(RECV_BURST);
    let mut controlled = true;
    loop {
        let received = tokio::select! {
            biased;
            reconfigure = control.recv(), if controlled => {
                let Some(Reconfigure { config, applied }) = reconfigure else {
                    controlled = false;
                    continue;
                };
                validator.reconfigure(&config);
                if output.send(Stage::Reconfigure(config)).await.is_err() {
                    tracing::error!("Aggregate stage gone; validation stops");
                    return;
                }
                // The reloader may have given up waiting; nothing to tell then.
                let _ = applied.send(());
                continue;
            }
            received = input.recv_many(&mut events, RECV_BURST) => received,
        };
        if received == 0 {
            break;
        }
        for event in events.drain(..) {
            let stage = match event {
                SourceEvent::Message(mut message) => Stage::Message {
                    checked: validator.check(&message),
                    ticket: message.ticket.take(),
                    device: message.device,
                },
                SourceEvent::Rejected { rejection, ticket } => Stage::Message {
                    device: rejection
                        .device
                        .clone()
                        .unwrap_or_else(|| DeviceId::new("")),
                    checked: Checked {
                        readings: Vec::new(),
                        rejection: Some(rejection),
                    },
                    ticket,
                },
                SourceEvent::Status(status) => Stage::Status(status),
                SourceEvent::Faults { device, counts } => Stage::Faults { device, counts },
                SourceEvent::Heartbeat(at) => Stage::Heartbeat(at),
            };
            if !send(&output, stage).await {
                tracing::error!("Aggregate stage gone; validation stops");
                return;
            }
        }
    }
}

/// Gathers checked messages into batches. A batch goes to the writer when the writer can
/// take it (group commit) and either `flush_interval` has passed since the previous one, or
/// it is full, or it holds enough unacknowledged messages that a broker may be waiting for
/// their commit before it sends more.
pub async fn aggregate(
    mut batcher: Batcher,
    flush_interval: Duration,
    mut input: mpsc::Receiver<Stage>,
    output: mpsc::Sender<Batch>,
) {
    let mut last_flush = Instant::now();
    let mut open = true;
    let mut items = Vec::with_capacity(RECV_BURST);
    while open {
        let due = last_flush + flush_interval;
        let may_flush = !batcher.is_empty()
            && (batcher.is_full() || batcher.holds_up_acks() || Instant::now() >= due);
        let waiting_for_due = !batcher.is_empty() && !may_flush;
        tokio::select! {
            biased;
            received = input.recv_many(&mut items, RECV_BURST), if !batcher.is_full() => {
                open = received > 0;
                for item in items.drain(..) {
                    match item {
                        Stage::Message { device, checked, ticket } => batcher.push(&device, checked, ticket),
                        Stage::Status(status) => batcher.push_status(status),
                        Stage::Faults { device, counts } => batcher.push_faults(device, &counts),
                        Stage::Heartbeat(at) => batcher.push_heartbeat(at),
                        Stage::Reconfigure(config) => batcher.push_reconfigure(config),
                    }
                }
            }
            permit = output.reserve(), if may_flush => match permit {
                Ok(permit) => {
                    permit.send(batcher.take());
                    last_flush = Instant::now();
                }
                Err(_) => {
                    tracing::error!("Writer gone; aggregation stops");
                    return;
                }
            },
            () = tokio::time::sleep_until(due), if waiting_for_due => {}
        }
    }
    if !batcher.is_empty() && output.send(batcher.take()).await.is_err() {
        tracing::error!("Writer gone before the last batch");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::validate::Checked;
    use crate::reading::Settle;

    struct Ignore;
    impl Settle for Ignore {
        fn settle(&self, _: u64, _: u64) {}
        fn abandon(&self, _: u64, _: u64) {}
    }

    fn message(seq: u64) -> Stage {
        Stage::Message {
            device: DeviceId::new("d"),
            checked: Checked::default(),
            ticket: Some(Ticket::new(Arc::new(Ignore), 0, seq)),
        }
    }

    /// After a first batch, feeds `messages` unacknowledged messages to an aggregate stage
    /// with a 10 s flush interval that flushes at once for 4 of them; returns how long the
    /// next batch took and its size.
    async fn next_batch_after(messages: u64) -> (Duration, usize) {
        let (stages, input) = mpsc::channel(16);
        let (output, mut batches) = mpsc::channel(1);
        tokio::spawn(aggregate(
            Batcher::new(vec![60_000], 1000, 4),
            Duration::from_secs(10),
            input,
            output,
        ));
        stages.send(message(0)).await.unwrap();
        let first = batches.recv().await.unwrap();
        assert_eq!(first.tickets.len(), 1);
        let started = Instant::now();
        for seq in 1..=messages {
            stages.send(message(seq)).await.unwrap();
        }
        let batch = batches.recv().await.unwrap();
        let tickets = batch.tickets.len();
        for ticket in batch.tickets.into_iter().chain(first.tickets) {
            ticket.settle();
        }
        (started.elapsed(), tickets)
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_holding_half_the_unacked_window_goes_before_the_flush_interval() {
        let (waited, tickets) = next_batch_after(4).await;
        assert_eq!(tickets, 4);
        assert!(waited < Duration::from_secs(1), "waited {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn fewer_unacknowledged_messages_wait_for_the_flush_interval() {
        let (waited, tickets) = next_batch_after(3).await;
        assert_eq!(tickets, 3);
        assert!(waited >= Duration::from_secs(10), "waited {waited:?}");
    }
}
