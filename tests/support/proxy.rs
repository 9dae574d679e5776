//! A TCP fault proxy between the gateway and the broker: it passes bytes through, or stalls
//! them, slows them, cuts every connection, or black-holes (accepts, then never answers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Pass,
    /// Bytes wait in the proxy, both ways; connections stay open.
    Stall,
    /// Each chunk waits this long before it goes on.
    Slow(Duration),
    /// New connections are accepted and never answered; open ones stall.
    BlackHole,
}

pub struct Proxy {
    pub port: u16,
    mode: watch::Sender<Mode>,
    /// Cancelled to cut every open connection; replaced by a fresh one.
    cut: Arc<std::sync::Mutex<CancellationToken>>,
    stop: CancellationToken,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (mode, modes) = watch::channel(Mode::Pass);
        let cut = Arc::new(std::sync::Mutex::new(CancellationToken::new()));
        let stop = CancellationToken::new();
        let (cuts, stopped) = (cut.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stopped.cancelled() => return,
                };
                let Ok((client, _)) = accepted else { continue };
                let token = cuts.lock().unwrap().clone();
                tokio::spawn(serve(client, upstream, modes.clone(), token));
            }
        });
        Self {
            port,
            mode,
            cut,
            stop,
        }
    }

    pub fn set(&self, mode: Mode) {
        self.mode.send_replace(mode);
    }

    /// Closes every open connection, as a pulled cable or a NAT timeout would.
    pub fn cut(&self) {
        let mut token = self.cut.lock().unwrap();
        token.cancel();
        *token = CancellationToken::new();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.cut();
    }
}

async fn serve(
    client: TcpStream,
    upstream: SocketAddr,
    modes: watch::Receiver<Mode>,
    cut: CancellationToken,
) {
    if *modes.borrow() == Mode::BlackHole {
        // Hold the socket and say nothing until cut.
        cut.cancelled().await;
        drop(client);
        return;
    }
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::select! {
        () = pump(client_read, server_write, modes.clone()) => {}
        () = pump(server_read, client_write, modes) => {}
        () = cut.cancelled() => {}
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut modes: watch::Receiver<Mode>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let Ok(n) = from.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        loop {
            let mode = *modes.borrow_and_update();
            match mode {
                Mode::Pass => break,
                Mode::Slow(delay) => {
                    tokio::time::sleep(delay).await;
                    break;
                }
                Mode::Stall | Mode::BlackHole => {
                    if modes.changed().await.is_err() {
                        return;
                    }
                }
            }
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
