//! A virtual serial port: a pseudo-terminal whose slave side appears at a path the caller
//! chooses (a symlink, like `/dev/serial/by-id/...`), so the gateway opens it exactly as it
//! opens a USB adapter.
//!
//! Findings on Linux that shape this module:
//!
//! - The simulator does **not** keep a slave fd of its own. Reading the master while nobody
//!   has the slave open fails with `EIO` and `poll` reports `POLLHUP`; that tells the
//!   simulator whether a reader is connected ([`Pty::peer_connected`]), which is what a line
//!   sensor needs to write only what the gateway can receive. `read` treats `EIO` as "nobody
//!   connected yet" and retries after a short sleep instead of failing or spinning.
//! - Bytes written to the master while nobody has the slave open are **kept** by the kernel
//!   and delivered to the next opener (tokio-serial does not flush on open on Linux). Real
//!   UARTs drop what arrives while a port is closed, so the sensors here do not write while
//!   [`Pty::peer_connected`] is false.
//! - Terminal settings of the slave (raw mode, set here with `cfmakeraw`, no echo) persist
//!   across the opener's close and reopen as long as the master is open.
//! - tokio-serial (serialport 4.10) opens with `TIOCEXCL` **and** an exclusive `flock`. The
//!   flock makes a second open fail even for root while the first is open; it ends with the
//!   opener's process. `TIOCEXCL` instead stays on the pty after an opener is killed without
//!   closing cleanly, for as long as this master lives: a non-root gateway restarted after
//!   `SIGKILL` then gets `EBUSY` (root bypasses `TIOCEXCL`). [`Pty::replug`] makes a fresh pty
//!   and clears it, as pulling and reinserting a USB adapter would.
//! - Closing the master (unplug) hangs up the slave: the opener's reads return end of file
//!   and its writes fail with `EIO`. Bytes it had not read yet are lost, like bytes in a UART
//!   FIFO when the cable is pulled.
//! - tokio never clears a hang-up once an `AsyncFd` has seen one, so after the first
//!   `POLLHUP` the master would look readable forever; the master is registered afresh when
//!   a reader comes back (see `Pty::io`).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How long to wait before looking again for a reader on the slave side.
const PEER_RETRY: Duration = Duration::from_millis(10);

#[derive(Debug, thiserror::Error)]
pub enum PtyError {
    #[error("cannot create a pseudo-terminal")]
    Open(#[source] Errno),
    #[error("cannot configure the pseudo-terminal {device}")]
    Configure {
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{0} exists and is not a symlink; refusing to replace it")]
    NotALink(PathBuf),
    #[error("cannot point {link} at {device}")]
    Link {
        link: PathBuf,
        device: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the port at {0} is unplugged")]
    Unplugged(PathBuf),
    #[error("I/O on the pseudo-terminal behind {link}")]
    Io {
        link: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A pseudo-terminal exposed at a path. The simulator reads and writes the master side; the
/// gateway opens the path (the slave side). Unplugging removes the path and hangs up the
/// slave; replugging points the same path at a new pseudo-terminal.
#[derive(Debug)]
pub struct Pty {
    link: PathBuf,
    plugged: Option<Plugged>,
}

#[derive(Debug)]
struct Plugged {
    /// Shared so a stale registration can be swapped for a fresh one from `&self`.
    master: Mutex<Arc<AsyncFd<OwnedFd>>>,
    device: PathBuf,
}

impl Pty {
    /// Creates a pseudo-terminal in raw mode and points `link` at its slave device,
    /// replacing an existing symlink atomically.
    ///
    /// # Errors
    /// When no pseudo-terminal can be made or configured, or `link` cannot be created (its
    /// directory is missing, or it exists and is not a symlink).
    ///
    /// # Panics
    /// Outside a tokio runtime (the master is registered with its reactor).
    pub fn open(link: impl Into<PathBuf>) -> Result<Self, PtyError> {
        let mut pty = Self {
            link: link.into(),
            plugged: None,
        };
        pty.replug()?;
        Ok(pty)
    }

    /// The path the gateway opens.
    pub fn path(&self) -> &Path {
        &self.link
    }

    /// The slave device behind the path (`/dev/pts/N`) while plugged.
    pub fn device(&self) -> Option<&Path> {
        self.plugged.as_ref().map(|p| p.device.as_path())
    }

    pub fn is_plugged(&self) -> bool {
        self.plugged.is_some()
    }

    /// Whether someone has the slave side open, so that written bytes reach a reader now
    /// rather than wait in the kernel for the next opener.
    pub fn peer_connected(&self) -> bool {
        let Some(plugged) = &self.plugged else {
            return false;
        };
        let master = lock(&plugged.master).clone();
        let mut fds = [PollFd::new(master.get_ref().as_fd(), PollFlags::POLLOUT)];
        match poll(&mut fds, PollTimeout::ZERO) {
            Ok(_) => !fds[0]
                .revents()
                .is_some_and(|r| r.intersects(PollFlags::POLLHUP | PollFlags::POLLERR)),
            Err(_) => false,
        }
    }

    /// Waits until someone opens the slave side.
    ///
    /// # Errors
    /// When the port is unplugged.
    pub async fn wait_for_peer(&self) -> Result<(), PtyError> {
        loop {
            if self.plugged.is_none() {
                return Err(PtyError::Unplugged(self.link.clone()));
            }
            if self.peer_connected() {
                return Ok(());
            }
            tokio::time::sleep(PEER_RETRY).await;
        }
    }

    /// Reads what the gateway wrote. While nobody has the slave open it waits (the master
    /// reports `EIO` then), so it returns only real bytes.
    ///
    /// # Errors
    /// When the port is unplugged or the master fails otherwise.
    pub async fn read(&self, buf: &mut [u8]) -> Result<usize, PtyError> {
        self.io(Interest::READABLE, |fd| nix::unistd::read(fd, buf))
            .await
    }

    /// Writes all of `bytes` to the slave's input. Bytes written while nobody has the slave
    /// open wait in the kernel for the next opener; check [`Pty::peer_connected`] first
    /// where that matters.
    ///
    /// # Errors
    /// When the port is unplugged or the master fails.
    pub async fn write_all(&self, mut bytes: &[u8]) -> Result<(), PtyError> {
        while !bytes.is_empty() {
            let n = self
                .io(Interest::WRITABLE, |fd| nix::unistd::write(fd, bytes))
                .await?;
            bytes = &bytes[n..];
        }
        Ok(())
    }

    /// One non-blocking operation on the master, retried until it does something.
    ///
    /// tokio keeps a hang-up (`POLLHUP`, seen whenever nobody has the slave open) as a
    /// readiness that is never cleared, so after the first one the master would look ready
    /// forever and a waiting read would spin. On `EAGAIN` under such a stale readiness the
    /// master is registered afresh (a dup of its fd) once a reader is back, or looked at
    /// again after a short sleep while nobody is there. `EIO` from a read also means nobody
    /// is there.
    async fn io<R>(
        &self,
        interest: Interest,
        mut op: impl FnMut(&OwnedFd) -> nix::Result<R>,
    ) -> Result<R, PtyError> {
        loop {
            let master = self.master()?;
            let mut guard = master.ready(interest).await.map_err(|e| self.io_error(e))?;
            let closed = guard.ready().is_read_closed() || guard.ready().is_write_closed();
            match op(master.get_ref()) {
                Ok(done) => return Ok(done),
                Err(Errno::EAGAIN) => {
                    guard.clear_ready();
                    drop(guard);
                    if closed {
                        if self.peer_connected() {
                            self.refresh(&master)?;
                        } else {
                            tokio::time::sleep(PEER_RETRY).await;
                        }
                    }
                }
                Err(Errno::EIO) if interest == Interest::READABLE => {
                    guard.clear_ready();
                    drop(guard);
                    tokio::time::sleep(PEER_RETRY).await;
                }
                Err(Errno::EINTR) => {}
                Err(errno) => return Err(self.io_error(errno.into())),
            }
        }
    }

    /// Pulls the cable: closes the master, which hangs up the slave (the gateway's reads
    /// end, its writes fail), and removes the path. Does nothing when already unplugged.
    pub fn unplug(&mut self) {
        if let Some(plugged) = self.plugged.take() {
            remove_link_to(&self.link, &plugged.device);
            tracing::debug!(path = %self.link.display(), device = %plugged.device.display(), "Pty unplugged");
        }
    }

    /// Plugs in a new device: a fresh pseudo-terminal at the same path. Unplugs first if
    /// plugged.
    ///
    /// # Errors
    /// As [`Pty::open`].
    pub fn replug(&mut self) -> Result<(), PtyError> {
        self.unplug();
        let pty = nix::pty::openpty(None, None).map_err(PtyError::Open)?;
        let device = nix::unistd::ttyname(&pty.slave).map_err(PtyError::Open)?;
        let configure = |source: io::Error| PtyError::Configure {
            device: device.clone(),
            source,
        };
        // Raw mode on the slave: no echo (the master would read its own output back), no
        // line editing, no CR/LF translation. The opener sets its own modes too; these hold
        // for openers that do not.
        let mut termios = tcgetattr(&pty.slave).map_err(|e| configure(e.into()))?;
        cfmakeraw(&mut termios);
        tcsetattr(&pty.slave, SetArg::TCSANOW, &termios).map_err(|e| configure(e.into()))?;
        // The slave fd is closed here on purpose: see the module docs.
        drop(pty.slave);
        let flags = fcntl(&pty.master, FcntlArg::F_GETFL).map_err(|e| configure(e.into()))?;
        let flags = OFlag::from_bits_retain(flags) | OFlag::O_NONBLOCK;
        fcntl(&pty.master, FcntlArg::F_SETFL(flags)).map_err(|e| configure(e.into()))?;
        let master = register(pty.master).map_err(configure)?;
        link_atomically(&self.link, &device)?;
        tracing::debug!(path = %self.link.display(), device = %device.display(), "Pty plugged");
        self.plugged = Some(Plugged {
            master: Mutex::new(Arc::new(master)),
            device,
        });
        Ok(())
    }

    fn master(&self) -> Result<Arc<AsyncFd<OwnedFd>>, PtyError> {
        self.plugged
            .as_ref()
            .map(|p| lock(&p.master).clone())
            .ok_or_else(|| PtyError::Unplugged(self.link.clone()))
    }

    /// Replaces `stale` with a fresh registration of the same master, unless another
    /// caller already has.
    fn refresh(&self, stale: &Arc<AsyncFd<OwnedFd>>) -> Result<(), PtyError> {
        let Some(plugged) = &self.plugged else {
            return Err(PtyError::Unplugged(self.link.clone()));
        };
        let mut current = lock(&plugged.master);
        if Arc::ptr_eq(&current, stale) {
            let dup = stale
                .get_ref()
                .try_clone()
                .and_then(register)
                .map_err(|e| self.io_error(e))?;
            *current = Arc::new(dup);
        }
        Ok(())
    }

    fn io_error(&self, source: io::Error) -> PtyError {
        PtyError::Io {
            link: self.link.clone(),
            source,
        }
    }
}

impl Drop for Pty {
    fn drop(&mut self) {
        self.unplug();
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open and keeps its one fd until the `AsyncFd` drops it.
    unsafe { AsyncFd::register(fd) }.map_err(|e| e.into_parts().1)
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Points `link` at `device` by renaming a fresh symlink over it, so an opener never sees
/// the path missing or half made.
fn link_atomically(link: &Path, device: &Path) -> Result<(), PtyError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let err = |source| PtyError::Link {
        link: link.to_path_buf(),
        device: device.to_path_buf(),
        source,
    };
    if let Ok(meta) = std::fs::symlink_metadata(link)
        && !meta.file_type().is_symlink()
    {
        return Err(PtyError::NotALink(link.to_path_buf()));
    }
    let name = link
        .file_name()
        .ok_or_else(|| err(io::Error::new(io::ErrorKind::InvalidInput, "no file name")))?;
    let tmp = link.with_file_name(format!(
        ".{}.{}-{}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    std::os::unix::fs::symlink(device, &tmp).map_err(err)?;
    std::fs::rename(&tmp, link).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(e)
    })
}

/// Removes `link` if it still points at `device`; a path someone else has taken over since
/// is left alone.
fn remove_link_to(link: &Path, device: &Path) {
    if std::fs::read_link(link).is_ok_and(|target| target == device) {
        let _ = std::fs::remove_file(link);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_serial::SerialPortBuilderExt;

    const STEP: Duration = Duration::from_secs(5);

    async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + STEP;
        while !condition() {
            assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn open_serial(path: &Path) -> tokio_serial::SerialStream {
        tokio_serial::new(path.to_string_lossy(), 9600)
            .open_native_async()
            .expect("tokio-serial opens the pty path")
    }

    async fn read_exactly(port: &mut tokio_serial::SerialStream, n: usize) -> Vec<u8> {
        let mut got = vec![0; n];
        tokio::time::timeout(STEP, port.read_exact(&mut got))
            .await
            .expect("read in time")
            .expect("read");
        got
    }

    #[tokio::test]
    async fn tokio_serial_reads_what_the_simulator_writes_and_back() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("ttySIM0")).unwrap();
        assert!(!pty.peer_connected());
        let mut port = open_serial(pty.path());
        assert!(pty.peer_connected());
        pty.write_all(b"21.5\n").await.unwrap();
        assert_eq!(read_exactly(&mut port, 5).await, b"21.5\n");
        port.write_all(b"READ\r\n").await.unwrap();
        let mut got = Vec::new();
        while got.len() < 6 {
            let mut buf = [0; 16];
            let n = tokio::time::timeout(STEP, pty.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        // Raw mode: no echo back to the opener, no CR/LF translation.
        assert_eq!(got, b"READ\r\n");
        let mut buf = [0; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), port.read(&mut buf))
                .await
                .is_err(),
            "nothing echoed"
        );
    }

    #[tokio::test]
    async fn the_slave_is_raw_for_openers_that_keep_its_modes() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        // A plain open changes no terminal modes: what it sees is this module's setup.
        let mut plain = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(pty.path())
            .unwrap();
        pty.write_all(b"a\r\nb\n").await.unwrap();
        let mut got = [0; 5];
        std::io::Read::read_exact(&mut plain, &mut got).unwrap();
        assert_eq!(&got, b"a\r\nb\n", "no CR/LF translation");
        let mut buf = [0; 8];
        assert!(
            tokio::time::timeout(Duration::from_millis(100), pty.read(&mut buf))
                .await
                .is_err(),
            "the simulator does not read its own output back"
        );
    }

    /// This thread's CPU time: a `#[tokio::test]` runs its tasks on its own thread, and
    /// the process's time would count the tests running beside it.
    fn cpu_time() -> Duration {
        let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_THREAD_CPUTIME_ID).unwrap();
        Duration::from(t)
    }

    /// tokio never clears a hang-up readiness; without care a read waiting on a connected
    /// but silent reader would spin.
    #[tokio::test]
    async fn waiting_for_a_silent_reader_does_not_spin() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        for _ in 0..2 {
            let mut port = open_serial(pty.path());
            let before = cpu_time();
            let mut buf = [0; 8];
            let waited = tokio::time::timeout(Duration::from_millis(300), pty.read(&mut buf)).await;
            assert!(waited.is_err(), "nothing to read");
            let spent = cpu_time() - before;
            assert!(spent < Duration::from_millis(100), "spun for {spent:?}");
            port.write_all(b"y").await.unwrap();
            let n = tokio::time::timeout(STEP, pty.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(&buf[..n], b"y");
            drop(port);
            wait_for("the reader has gone", || !pty.peer_connected()).await;
            let before = cpu_time();
            let waited = tokio::time::timeout(Duration::from_millis(300), pty.read(&mut buf)).await;
            assert!(waited.is_err());
            assert!(
                cpu_time() - before < Duration::from_millis(100),
                "no spin without a reader"
            );
        }
    }

    #[tokio::test]
    async fn reading_waits_while_nobody_has_the_port_open() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        let mut buf = [0; 8];
        // EIO underneath: it waits rather than fails.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), pty.read(&mut buf))
                .await
                .is_err()
        );
        let mut port = open_serial(pty.path());
        port.write_all(b"x").await.unwrap();
        let n = tokio::time::timeout(STEP, pty.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..n], b"x");
        drop(port);
        wait_for("the reader has gone", || !pty.peer_connected()).await;
        assert!(
            tokio::time::timeout(Duration::from_millis(100), pty.read(&mut buf))
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn unplug_ends_the_readers_stream_and_replug_serves_a_fresh_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ttyUSB-sim");
        let mut pty = Pty::open(&path).unwrap();
        let first = pty.device().unwrap().to_path_buf();
        let mut port = open_serial(&path);
        pty.write_all(b"one\n").await.unwrap();
        assert_eq!(read_exactly(&mut port, 4).await, b"one\n");

        pty.unplug();
        assert!(!path.exists() && std::fs::symlink_metadata(&path).is_err());
        let mut buf = [0; 8];
        let ended = tokio::time::timeout(STEP, port.read(&mut buf))
            .await
            .expect("the read ends");
        // The hang-up reads as end of file; writes fail with EIO.
        assert!(matches!(ended, Ok(0)), "EOF after unplug, got {ended:?}");
        assert!(port.write_all(b"x").await.is_err(), "writes fail");
        assert!(matches!(
            pty.write_all(b"x").await,
            Err(PtyError::Unplugged(_))
        ));
        assert!(
            tokio_serial::new(path.to_string_lossy(), 9600)
                .open_native_async()
                .is_err(),
            "nothing to open while unplugged"
        );

        pty.replug().unwrap();
        assert_ne!(pty.device().unwrap(), first, "a new device");
        let mut again = open_serial(&path);
        pty.write_all(b"two\n").await.unwrap();
        assert_eq!(read_exactly(&mut again, 4).await, b"two\n");
        // The old handle stays dead.
        assert!(matches!(port.read(&mut buf).await, Ok(0) | Err(_)));
    }

    #[tokio::test]
    async fn opens_are_exclusive_while_the_first_is_open() {
        let dir = tempfile::tempdir().unwrap();
        let pty = Pty::open(dir.path().join("tty")).unwrap();
        let port = open_serial(pty.path());
        assert!(
            tokio_serial::new(pty.path().to_string_lossy(), 9600)
                .open_native_async()
                .is_err(),
            "a second open fails (flock), even for root"
        );
        drop(port);
        drop(open_serial(pty.path()));
    }

    #[tokio::test]
    async fn replaces_a_stale_symlink_but_not_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let link = dir.path().join("tty");
        std::os::unix::fs::symlink("/nonexistent", &link).unwrap();
        let pty = Pty::open(&link).unwrap();
        assert_eq!(std::fs::read_link(&link).unwrap(), pty.device().unwrap());
        drop(pty);
        assert!(std::fs::symlink_metadata(&link).is_err(), "removed on drop");

        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        assert!(matches!(Pty::open(&file), Err(PtyError::NotALink(_))));
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
    }
}
