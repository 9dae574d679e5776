//! Serving HTTP connections so that a stalled or hostile client cannot hurt the gateway: at
//! most `http.max_connections` at once (further ones wait in the kernel's accept queue, so a
//! flood of sockets cannot use up the process's file descriptors), `http.header_timeout` to
//! send a request's headers (a client trickling them, or an idle keep-alive connection, is
//! closed), and `http.send_timeout` for a client to take any bytes of a response (a client
//! that stops reading is cut off, which ends the query behind the response and releases its
//! read snapshot).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How long a stop lets requests in flight finish.
const STOP_GRACE: Duration = Duration::from_secs(2);
/// How long accepting pauses after it failed (out of file descriptors, say).
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// The limits one listener serves with.
#[derive(Clone, Copy, Debug)]
pub(super) struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub send_timeout: Duration,
}

/// Accepts and serves connections until `stop`, then lets those in flight finish for
/// [`STOP_GRACE`].
pub(super) async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    stop: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot,
            () = stop.cancelled() => break,
        };
        let Ok(slot) = slot else {
            break;
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = stop.cancelled() => break,
        };
        let tcp = match accepted {
            Ok((tcp, _)) => tcp,
            Err(err) => {
                tracing::warn!(error = %err, "HTTP connection not accepted");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let io = TokioIo::new(Stalls::new(tcp, limits.send_timeout));
        let service = TowerToHyperService::new(router.clone());
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
        let connection = builder.serve_connection(io, service);
        let stop = stop.clone();
        connections.spawn(async move {
            let _slot = slot;
            tokio::pin!(connection);
            let ended = tokio::select! {
                ended = connection.as_mut() => ended,
                () = stop.cancelled() => {
                    connection.as_mut().graceful_shutdown();
                    match tokio::time::timeout(STOP_GRACE, connection.as_mut()).await {
                        Ok(ended) => ended,
                        Err(_) => Ok(()),
                    }
                }
            };
            if let Err(err) = ended {
                tracing::debug!(error = %err, "HTTP connection ended");
            }
        });
    }
    connections.close();
    let _ = tokio::time::timeout(STOP_GRACE, connections.wait()).await;
}

/// A connection whose writes fail once the client has taken nothing for `timeout`: hyper
/// then closes it, and the response's body, with the query feeding it, is dropped.
struct Stalls<S> {
    inner: S,
    timeout: Duration,
    /// Set while a write waits for the client.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<S> Stalls<S> {
    fn new(inner: S, timeout: Duration) -> Self {
        Self {
            inner,
            timeout,
            stalled: None,
        }
    }

    /// A write that made no progress: fails once the client has been stalled for the
    /// timeout, else waits (and is woken at the timeout).
    fn waiting<T>(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<T>> {
        let timeout = self.timeout;
        let deadline = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client took no data for {timeout:?} (http.send_timeout)"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Stalls<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Stalls<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Pending => this.waiting(cx),
            ready => {
                this.stalled = None;
                ready
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write_vectored(cx, bufs) {
            Poll::Pending => this.waiting(cx),
            ready => {
                this.stalled = None;
                ready
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Pending => this.waiting(cx),
            ready => {
                this.stalled = None;
                ready
            }
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::AsyncWriteExt;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_write_the_client_never_takes_fails_at_the_timeout() {
        let (near, _far) = tokio::io::duplex(16);
        let mut stalls = Stalls::new(near, Duration::from_secs(10));
        let started = tokio::time::Instant::now();
        let err = stalls.write_all(&[0; 64]).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(started.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_slow_client_that_takes_some_data_is_not_cut_off() {
        use tokio::io::AsyncReadExt;
        let (near, mut far) = tokio::io::duplex(16);
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut buf = [0; 8];
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                match far.read(&mut buf).await {
                    Ok(0) | Err(_) => return got,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
        });
        let mut stalls = Stalls::new(near, Duration::from_secs(10));
        stalls.write_all(&[7; 64]).await.unwrap();
        drop(stalls);
        assert_eq!(reader.await.unwrap(), vec![7; 64]);
    }
}
