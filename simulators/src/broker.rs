//! An embedded MQTT broker (rumqttd) for the demo and tests: no install, no shared state.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no free loopback port: {0}")]
    Port(#[source] std::io::Error),
    #[error("embedded broker did not accept connections on {0} within 5s")]
    NotListening(SocketAddr),
}

/// A running embedded broker. rumqttd has no shutdown: it lives until the process ends.
pub struct EmbeddedBroker {
    pub port: u16,
}

impl EmbeddedBroker {
    /// Starts rumqttd on a free loopback port with persistent sessions, and waits until it
    /// accepts connections.
    ///
    /// # Errors
    /// When no port is free or the broker does not come up.
    pub fn start() -> Result<Self, BrokerError> {
        // rumqttd cannot report a port bound as 0: reserve one, release it, hand it over.
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(BrokerError::Port)?
            .port();
        let listen: SocketAddr = ([127, 0, 0, 1], port).into();
        let server = ServerSettings {
            name: "v4".into(),
            listen,
            tls: None,
            next_connection_delay_ms: 1,
            connections: ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 1 << 20,
                max_inflight_count: 1000,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        };
        let config = Config {
            id: 0,
            router: RouterConfig {
                max_connections: 1000,
                max_outgoing_packet_count: 1000,
                max_segment_size: 100 << 20,
                max_segment_count: 10,
                ..Default::default()
            },
            v4: Some(HashMap::from([("v4".to_string(), server)])),
            ..Default::default()
        };
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(err) = broker.start() {
                    tracing::error!(error = %err, "Embedded broker stopped");
                }
            })
            .map_err(BrokerError::Port)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_err() {
            if Instant::now() > deadline {
                return Err(BrokerError::NotListening(listen));
            }
            #[allow(
                clippy::disallowed_methods,
                reason = "a synchronous constructor waiting for the broker thread"
            )]
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(Self { port })
    }
}
