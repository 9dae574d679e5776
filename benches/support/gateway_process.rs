//! `sensorgate run` as a child process that tells when it is ready, as under systemd's
//! `Type=notify`: the benches that time the binary itself start it through this.

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `sensorgate run`; killed if dropped before [`Gateway::stop`].
pub struct Gateway {
    child: Child,
    notify: UnixDatagram,
    started: Instant,
}

impl Gateway {
    /// Starts `bin run --config config` with `NOTIFY_SOCKET` set to a socket beside the
    /// config file, its output discarded.
    pub fn start(bin: &Path, config: &Path) -> Self {
        let socket_path = config.with_extension("notify");
        let _ = std::fs::remove_file(&socket_path);
        let notify = UnixDatagram::bind(&socket_path).expect("notify socket");
        notify
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("socket timeout");
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("NOTIFY_SOCKET", &socket_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("sensorgate run");
        Self {
            child,
            notify,
            started,
        }
    }

    /// Waits for `READY=1`; returns the time since the spawn.
    pub fn wait_ready(&mut self) -> Duration {
        let mut message = [0u8; 512];
        loop {
            let n = self.notify.recv(&mut message).expect("READY=1 within 30 s");
            if String::from_utf8_lossy(&message[..n])
                .lines()
                .any(|l| l == "READY=1")
            {
                return self.started.elapsed();
            }
        }
    }

    /// The process id, for `/proc`.
    #[allow(
        dead_code,
        reason = "each bench compiles this module; not all of them read /proc"
    )]
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then waits for the drain and a clean exit.
    pub fn stop(mut self) {
        // SAFETY: kill(2) with a pid this process started and has not reaped.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let status = self.child.wait().expect("sensorgate exit");
        assert!(status.success(), "sensorgate exited with {status}");
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        // After `stop` the child is reaped: kill fails harmlessly.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
