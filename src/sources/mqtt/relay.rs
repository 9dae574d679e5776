//! The broker connection as rumqttc sees it: a Unix socket in a private directory, behind
//! which a relay task opens the real connection (TCP, and TLS for `mqtts://`) and passes
//! the broker's bytes through the [`oversize`](super::oversize) filter.
//!
//! rumqttc opens its connections itself and reads packets straight off them; nothing can be
//! put between its socket and its packet reader (its connection type is not public). So each
//! session's rumqttc is pointed at a Unix socket only the gateway's user can reach, and for
//! each connection it makes the relay makes one to the broker. What rumqttc writes goes to
//! the broker unchanged; what the broker writes goes back with every publish over
//! `max_payload` cut to its first bytes. Either side closing closes both, so rumqttc sees a
//! broken or closed broker connection as before, and reconnects with its backoff.
//!
//! The relay costs one more read and write per chunk of the stream (up to 64 KiB), not per
//! message: after a read that found little it waits before reading again.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::tokio_rustls::TlsConnector;
use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rumqttc::tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::guard::Guarded;
use super::oversize::{Cuts, Filter};
use crate::config::BrokerConfig;
use crate::reading::RAW_PREFIX;

/// How long TCP and TLS together may take to reach the broker: less than rumqttc's 5 s for
/// its whole connect, so the relay's reason reaches the session first.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// How much of the broker's stream the relay passes on at once.
const RELAY_CHUNK: usize = 64 * 1024;
/// How long the relay waits to read again after a read that found little. It adds at most
/// this much latency (against a 100 ms flush interval); 2 ms left the relay costing 7 to
/// 12 % more CPU at a steady 5,000 msg/s than reading from the socket in rumqttc did, 10 ms
/// about nothing (`cargo bench --bench ingest`, BENCH_QOS=steady, beside the build before
/// the relay).
const READ_PAUSE: Duration = Duration::from_millis(10);
/// How long a connection's other direction may go on once one has ended: what the session
/// wrote last (acknowledgements, DISCONNECT) still goes out.
const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Room above the largest publish rumqttc is handed for its fixed header, topic (at most
/// 65,535 bytes) and packet id.
const HEADER_ROOM: usize = 5 + 2 + 65_535 + 2;

/// The largest packet rumqttc needs to read from a broker with this `max_payload`: the
/// filter cuts larger publishes to [`RAW_PREFIX`] bytes of payload, which may be more than
/// a small `max_payload`.
pub(super) fn max_packet(max_payload: usize) -> usize {
    max_payload.max(RAW_PREFIX).saturating_add(HEADER_ROOM)
}

/// A relay for one broker session, and the task that runs it; dropping the relay stops the
/// task, which first passes on what the session wrote last.
pub(super) struct Relay {
    path: String,
    shared: Arc<Shared>,
    _stop: DropGuard,
    /// Removed with the socket in it when the relay is dropped.
    _dir: tempfile::TempDir,
}

/// What the relay tells the session.
#[derive(Default)]
struct Shared {
    /// The cuts of the newest connection.
    cuts: Mutex<Arc<Cuts>>,
    /// Why the last broker connection could not be opened or ended, until taken.
    error: Mutex<Option<String>>,
}

impl Shared {
    fn fail(&self, reason: String) {
        *lock(&self.error) = Some(reason);
    }
}

impl Relay {
    /// Binds the Unix socket; returns the relay and its task, for the caller to spawn
    /// beside the session's.
    ///
    /// # Errors
    /// When the private directory or the socket cannot be made.
    pub fn start(
        broker: &BrokerConfig,
    ) -> io::Result<(Self, impl Future<Output = ()> + Send + 'static)> {
        let dir = tempfile::Builder::new()
            .prefix("sensorgate-mqtt-")
            .tempdir()?;
        let socket: PathBuf = dir.path().join("broker");
        let path = socket
            .to_str()
            .ok_or_else(|| io::Error::other("the temporary directory's path is not UTF-8"))?
            .to_string();
        let listener = UnixListener::bind(&socket)?;
        let shared = Arc::new(Shared::default());
        let stop = CancellationToken::new();
        let task = relay(listener, broker.clone(), shared.clone(), stop.clone());
        let relay = Self {
            path,
            shared,
            _stop: stop.drop_guard(),
            _dir: dir,
        };
        Ok((relay, task))
    }

    /// Where rumqttc connects.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// The cuts of the newest connection: after a CONNACK, the connection it came on.
    pub fn cuts(&self) -> Arc<Cuts> {
        lock(&self.shared.cuts).clone()
    }

    /// Why the broker connection could not be opened or ended, once.
    pub fn take_error(&self) -> Option<String> {
        lock(&self.shared.error).take()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

/// Accepts rumqttc's connections one at a time and relays each to the broker.
async fn relay(
    listener: UnixListener,
    broker: BrokerConfig,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => return,
        };
        let client = match accepted {
            Ok((client, _)) => client,
            Err(err) => {
                tracing::warn!(broker = %broker.id, error = %err, "Relay could not accept");
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                    () = stop.cancelled() => return,
                }
            }
        };
        *lock(&shared.error) = None;
        let cuts = Arc::new(Cuts::default());
        *lock(&shared.cuts) = cuts.clone();
        let opened = tokio::select! {
            opened = tokio::time::timeout(CONNECT_TIMEOUT, open(&broker)) => opened,
            () = stop.cancelled() => return,
        };
        let stream = match opened {
            Ok(Ok(stream)) => stream,
            Ok(Err(reason)) => {
                // Told before rumqttc sees its connection close.
                shared.fail(reason);
                drop(client);
                continue;
            }
            Err(_) => {
                shared.fail(format!(
                    "no connection to {} within {CONNECT_TIMEOUT:?}",
                    broker.url
                ));
                drop(client);
                continue;
            }
        };
        let guarded = Guarded::new(stream, Filter::new(broker.max_payload, cuts));
        // Once stopped, the session's side is closed: the pump ends when what it wrote last
        // is passed on, or after the grace.
        let pump = pump(client, guarded, &shared);
        tokio::pin!(pump);
        tokio::select! {
            () = &mut pump => {}
            () = stop.cancelled() => {
                let _ = tokio::time::timeout(DRAIN_GRACE, pump).await;
                return;
            }
        }
    }
}

/// A broker connection: TCP, or TLS over it.
trait BrokerStream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<S: AsyncRead + AsyncWrite + Unpin + Send> BrokerStream for S {}

/// Opens the broker connection; errs with why.
async fn open(broker: &BrokerConfig) -> Result<Box<dyn BrokerStream>, String> {
    let Some(endpoint) = broker.address() else {
        return Err(format!("url `{}` unusable", broker.url));
    };
    let tcp = TcpStream::connect((endpoint.host, endpoint.port))
        .await
        .map_err(|err| format!("I/O: {err}"))?;
    if !endpoint.tls {
        return Ok(Box::new(tcp));
    }
    let connector = tls_connector(broker).map_err(|err| err.to_string())?;
    let name = ServerName::try_from(endpoint.host.to_string())
        .map_err(|err| format!("TLS: `{}` is not a valid server name: {err}", endpoint.host))?;
    let stream = connector
        .connect(name, tcp)
        .await
        .map_err(|err| format!("TLS: {err}"))?;
    Ok(Box::new(stream))
}

/// Relays until one direction ends, then lets the other finish within [`DRAIN_GRACE`]:
/// when the broker's side ends, the session's is shut so rumqttc sees it; when the
/// session's side ends, what it wrote last has gone out. Records why in `shared`, before
/// rumqttc can see its connection close, when the broker's side was the one to end.
async fn pump<S>(client: UnixStream, broker: S, shared: &Shared)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_client, to_client) = client.into_split();
    let (mut from_broker, mut to_broker) = tokio::io::split(broker);
    let down = async move {
        let mut to_client = to_client;
        let ended = pass_down(&mut from_broker, &mut to_client).await;
        (ended, to_client)
    };
    let up = tokio::io::copy(&mut from_client, &mut to_broker);
    tokio::pin!(down, up);
    tokio::select! {
        (ended, to_client) = &mut down => {
            match ended {
                Ok(_) => shared.fail("the broker closed the connection".into()),
                Err(err) => shared.fail(format!("connection lost: {err}")),
            }
            // rumqttc reads the end and drops its side, which ends `up`.
            drop(to_client);
            let _ = tokio::time::timeout(DRAIN_GRACE, up).await;
        }
        ended = &mut up => {
            if let Err(err) = ended {
                shared.fail(format!("connection lost: {err}"));
            }
        }
    }
}

/// Passes the broker's (filtered) bytes to rumqttc until the broker's side ends. After a
/// read that found little, it waits [`READ_PAUSE`] before reading again, so the next read
/// takes what gathered meanwhile: read eagerly, a stream of small messages arrives a few at
/// a time, and each piece costs the relay a wake-up and two system calls, and rumqttc
/// another read (`cargo bench --bench ingest`, QoS 0: 7.2 µs of gateway CPU per message
/// against 5.6 before the relay, reading eagerly).
async fn pass_down<R, W>(from: &mut R, to: &mut W) -> io::Result<u64>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0; RELAY_CHUNK];
    let mut passed = 0;
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            to.flush().await?;
            return Ok(passed);
        }
        to.write_all(&buf[..n]).await?;
        passed += n as u64;
        if n < RELAY_CHUNK / 8 {
            tokio::time::sleep(READ_PAUSE).await;
        }
    }
}

/// Why the broker's TLS files cannot be used.
#[derive(Debug, thiserror::Error)]
enum TlsFileError {
    #[error("TLS: cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("TLS: {path}: {what}")]
    Invalid { path: PathBuf, what: String },
}

/// rustls with the CA file (and client certificate) the broker's config names, read at
/// every connection so a replaced file takes effect without a restart.
fn tls_connector(broker: &BrokerConfig) -> Result<TlsConnector, TlsFileError> {
    // Once per process; later calls find it installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|source| TlsFileError::Read {
            path: path.to_path_buf(),
            source,
        })
    };
    let invalid = |path: &std::path::Path, what: String| TlsFileError::Invalid {
        path: path.to_path_buf(),
        what,
    };
    let certificates = |path: &std::path::Path| -> Result<Vec<CertificateDer<'static>>, _> {
        CertificateDer::pem_slice_iter(&read(path)?)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|err| invalid(path, format!("not PEM certificates: {err}")))
    };
    let ca_path = broker.ca_file();
    let mut roots = RootCertStore::empty();
    roots.add_parsable_certificates(certificates(ca_path)?);
    if roots.is_empty() {
        return Err(invalid(ca_path, "holds no usable CA certificate".into()));
    }
    let builder = ClientConfig::builder().with_root_certificates(roots);
    let config = match (&broker.client_cert, &broker.client_key) {
        (Some(cert_path), Some(key_path)) => {
            let chain = certificates(cert_path)?;
            if chain.is_empty() {
                return Err(invalid(cert_path, "holds no certificate".into()));
            }
            let key = PrivateKeyDer::from_pem_slice(&read(key_path)?)
                .map_err(|err| invalid(key_path, format!("no usable private key: {err}")))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|err| invalid(key_path, err.to_string()))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(TlsConnector::from(Arc::new(config)))
}
