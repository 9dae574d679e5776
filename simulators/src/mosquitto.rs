//! A private Mosquitto process for tests and benchmarks: its own port, config and
//! persistence directory, so nothing depends on a shared broker's state.

use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A Mosquitto process with persistence in a temp dir, in-flight and queue limits sized for
/// tests and benchmarks. Killed on drop.
pub struct Mosquitto {
    pub port: u16,
    pub dir: tempfile::TempDir,
    conf: PathBuf,
    child: Child,
}

impl Mosquitto {
    /// Starts Mosquitto on a free loopback port.
    ///
    /// # Panics
    /// When `mosquitto` is not installed or does not come up within 10 s: the callers are
    /// tests and benchmarks, which cannot go on without it.
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// Starts Mosquitto with `extra` appended to its config (more listeners, TLS).
    ///
    /// # Panics
    /// As [`Mosquitto::start`].
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let conf = dir.path().join("mosquitto.conf");
        // Started as root, Mosquitto switches to the `mosquitto` user unless `user` says
        // otherwise, and could then not write into this directory.
        let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n\
                 persistence_location {dir}/\nautosave_interval 1\nuser {user}\n\
                 max_inflight_messages 1000\nmax_queued_messages 10000000\n\
                 log_dest file {dir}/mosquitto.log\n{extra}\n",
                dir = dir.path().display()
            ),
        )
        .expect("write mosquitto.conf");
        let child = spawn(&conf, port);
        Self {
            port,
            dir,
            conf,
            child,
        }
    }

    /// Kills the broker (as a crash would) and starts it again on the same port with the
    /// same persistence file.
    pub fn restart(&mut self) {
        self.kill();
        self.child = spawn(&self.conf, self.port);
    }

    /// The broker's process id, for measuring what it costs.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the broker with SIGKILL; [`Mosquitto::restart`] brings it back.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[allow(
    clippy::disallowed_methods,
    reason = "synchronous wait for a child process"
)]
fn spawn(conf: &std::path::Path, port: u16) -> Child {
    let child = Command::new("mosquitto")
        .arg("-c")
        .arg(conf)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("mosquitto must be installed (apt-get install mosquitto)");
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "mosquitto did not start on port {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
