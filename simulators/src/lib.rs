//! Sensor simulators for sensorgate. They speak only the wire protocol, so tests, the demo
//! and benchmarks drive the gateway exactly as real sensors would.
//!
//! - [`broker`]: an embedded MQTT broker (rumqttd) on a free loopback port.
//! - [`mosquitto`]: a private Mosquitto process, for tests and benchmarks.
//! - [`plan`]: deterministic sensor messages with fault scenarios, and what each should
//!   become in the gateway's database.
//! - [`publish`]: an MQTT publisher that paces a plan at a given rate.

pub mod broker;
pub mod modbus;
pub mod mosquitto;
pub mod plan;
pub mod pty;
pub mod publish;
pub mod serial;

pub use broker::EmbeddedBroker;
pub use mosquitto::Mosquitto;
pub use plan::{Expect, Fault, Format, Planned, Scenario};
pub use publish::{Pace, PublishReport, publish};
