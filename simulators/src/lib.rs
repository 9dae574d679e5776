//! Sensor simulators for sensorgate. They speak only the wire protocol, so tests, the demo
//! and benchmarks drive the gateway exactly as real sensors would.
//!
//! - [`broker`]: an embedded MQTT broker (rumqttd) on a free loopback port.
//! - [`mosquitto`]: a private Mosquitto process, for tests and benchmarks.
//! - [`plan`]: deterministic sensor messages with fault scenarios, and what each should
//!   become in the gateway's database.
//! - [`publish`](mod@publish): an MQTT publisher that paces a plan at a given rate, and a
//!   QoS 0 flood encoded ahead, for benchmarks.
//! - [`pty`]: a virtual serial port, a pseudo-terminal exposed at a chosen path, that can be
//!   unplugged and replugged.
//! - [`serial`]: text-line sensors on a pty (json, key_value, csv, regex lines) with faults,
//!   streaming or polled, and what each line should become.
//! - [`modbus`]: a Modbus RTU bus of energy meters on a pty, with a documented register map,
//!   exceptions, faults per slave, and a log of every value served.

pub mod broker;
pub mod modbus;
pub mod mosquitto;
pub mod plan;
pub mod pty;
pub mod publish;
pub mod serial;

pub use broker::EmbeddedBroker;
pub use modbus::ModbusBus;
pub use mosquitto::Mosquitto;
pub use plan::{Expect, Fault, Format, Planned, Scenario};
pub use pty::Pty;
pub use publish::{Flood, Pace, PublishReport, flood, publish};
pub use serial::{LineScenario, LineSensor};
