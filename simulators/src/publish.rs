//! Publishing a plan over MQTT at a steady rate.

use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Outgoing, Packet, QoS};
use tokio::sync::watch;
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
/// (at QoS 1 and 2, acknowledged them).
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
    let qos = match qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    };
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
    // The event loop runs on its own task; it counts what went out and what the broker
    // acknowledged, so the publisher can wait for both before it disconnects.
    let (progress_tx, mut progress) = watch::channel((0u64, 0u64));
    let driver = tokio::spawn(async move {
        let (mut sent, mut acked) = (0u64, 0u64);
        loop {
            match eventloop.poll().await {
                Ok(Event::Outgoing(Outgoing::Publish(_))) => sent += 1,
                Ok(Event::Incoming(Packet::PubAck(_) | Packet::PubComp(_))) => acked += 1,
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return Ok(()),
                Ok(_) => continue,
                Err(err) => {
                    return Err(PublishError::Lost {
                        sent,
                        error: err.to_string(),
                    });
                }
            }
            progress_tx.send_replace((sent, acked));
        }
    });
    let start = Instant::now();
    let mut published = 0u64;
    let (rate, burst) = match pace {
        Pace::Unlimited => (0.0, 1.0),
        Pace::Steady(rate) => (rate, 1.0),
        Pace::Bursts { rate, size } => (rate, f64::from(size.max(1))),
    };
    let tick = Duration::from_millis(10);
    let per_tick = rate * tick.as_secs_f64();
    let mut credit = 0.0;
    let mut ticker = tokio::time::interval(tick);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut messages = messages.peekable();
    while messages.peek().is_some() && !cancel.is_cancelled() {
        if rate > 0.0 {
            ticker.tick().await;
            credit += per_tick;
            if credit < burst {
                continue;
            }
        } else {
            credit = 1000.0;
        }
        while credit >= 1.0 {
            let Some(message) = messages.next() else {
                break;
            };
            if client
                .publish(message.topic, qos, false, message.payload)
                .await
                .is_err()
            {
                break;
            }
            published += 1;
            credit -= 1.0;
        }
    }
    // rumqttc drops what is still queued when it disconnects: wait until every publish is
    // written (QoS 0) or acknowledged by the broker (QoS 1 and 2).
    let done = |&(sent, acked): &(u64, u64)| {
        if qos == QoS::AtMostOnce {
            sent >= published
        } else {
            acked >= published
        }
    };
    if progress.wait_for(done).await.is_err() {
        return match driver.await {
            Ok(Err(err)) => Err(err),
            _ => Err(PublishError::Lost {
                sent: published,
                error: "event loop ended".into(),
            }),
        };
    }
    let _ = client.disconnect().await;
    match driver.await {
        Ok(Ok(_)) => {}
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
