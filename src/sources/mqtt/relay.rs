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
//! The relay costs one more read and write per chunk of the stream (16 KiB at full rate),
//! not per message.

use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rumqttc::tokio_rustls::TlsConnector;
use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rumqttc::tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixListener, UnixStream};
use tokio_util::sync::{CancellationToken, DropGuard};
use tokio_util::task::TaskTracker;

use super::oversize::{Cuts, Filter, Guarded};
use crate::config::BrokerConfig;

/// How long TCP and TLS may take to reach the broker: less than rumqttc's 5 s for its whole
/// connect, so the relay's reason reaches the session first.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(4);
/// How long a stopped relay goes on passing what its session wrote last.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// Room above `max_payload` for a PUBLISH's fixed header, topic (at most 65,535 bytes) and
/// packet id.
const HEADER_ROOM: usize = 5 + 2 + 65_535 + 2;

/// The largest packet rumqttc needs to read from a broker with this `max_payload`: the
/// filter cuts larger publishes.
pub(super) fn max_packet(max_payload: usize) -> usize {
    max_payload.saturating_add(HEADER_ROOM)
}

/// A running relay for one broker session; dropping it stops the relay.
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

impl Relay {
    /// Binds the Unix socket and starts the relay task on `tracker`.
    ///
    /// # Errors
    /// When the private directory or the socket cannot be made.
    pub fn start(broker: &BrokerConfig, tracker: &TaskTracker) -> io::Result<Self> {
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
        tracker.spawn(relay(
            listener,
            broker.clone(),
            shared.clone(),
            stop.clone(),
        ));
        Ok(Self {
            path,
            shared,
            _stop: stop.drop_guard(),
            _dir: dir,
        })
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
        let filter = Filter::new(broker.max_payload, cuts);
        let pump = connect_and_pump(&broker, client, filter);
        tokio::pin!(pump);
        let ended = tokio::select! {
            ended = &mut pump => ended,
            () = stop.cancelled() => {
                // The session is gone, its side closed: what it wrote last (the final
                // acknowledgements, DISCONNECT) still goes out before the connection ends.
                let _ = tokio::time::timeout(STOP_GRACE, pump).await;
                return;
            }
        };
        if let Err(reason) = ended {
            *lock(&shared.error) = Some(reason);
        }
    }
}

/// Opens the broker connection and passes bytes both ways until either side closes. Errs
/// with why, when the broker side was the one that failed or closed.
async fn connect_and_pump(
    broker: &BrokerConfig,
    client: UnixStream,
    filter: Filter,
) -> Result<(), String> {
    let Some(endpoint) = broker.address() else {
        return Err(format!("url `{}` unusable", broker.url));
    };
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        TcpStream::connect((endpoint.host, endpoint.port)),
    )
    .await
    .map_err(|_| {
        format!(
            "no answer from {}:{} within {CONNECT_TIMEOUT:?}",
            endpoint.host, endpoint.port
        )
    })?
    .map_err(|err| format!("I/O: {err}"))?;
    if !endpoint.tls {
        return pump(client, Guarded::new(tcp, filter)).await;
    }
    let connector = tls_connector(broker).map_err(|err| err.to_string())?;
    let name = ServerName::try_from(endpoint.host.to_string())
        .map_err(|err| format!("TLS: `{}` is not a valid server name: {err}", endpoint.host))?;
    let stream = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, tcp))
        .await
        .map_err(|_| format!("TLS: no handshake within {CONNECT_TIMEOUT:?}"))?
        .map_err(|err| format!("TLS: {err}"))?;
    pump(client, Guarded::new(stream, filter)).await
}

/// Relays until one side closes or fails, then drops both.
async fn pump<S>(client: UnixStream, broker: S) -> Result<(), String>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_broker, mut to_broker) = tokio::io::split(broker);
    tokio::select! {
        down = tokio::io::copy(&mut from_broker, &mut to_client) => match down {
            Ok(_) => Err("the broker closed the connection".into()),
            Err(err) => Err(format!("connection lost: {err}")),
        },
        // rumqttc closed its side (Ok), or writing to the broker failed.
        up = tokio::io::copy(&mut from_client, &mut to_broker) => match up {
            Ok(_) => Ok(()),
            Err(err) => Err(format!("connection lost: {err}")),
        },
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
