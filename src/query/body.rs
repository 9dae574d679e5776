//! A page of rows as a streamed JSON body, `{"device":..,"rows":[..],"next_cursor":..}`.
//! Rows are read from SQLite on the query's blocking thread and formatted on a second thread
//! beside it, handed over in batches: a large page then takes about the longer of reading
//! and formatting rather than their sum (a month of 1-minute rollups reads in about 11 ms
//! and formats in about 7). Both threads stop when the client goes away.

use std::io::Write;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use tokio::sync::mpsc;

use super::http::{Api, ApiError};
use super::rows::json_string;
use crate::storage::StorageError;
use crate::storage::read::{self, Cursor, SeriesQuery, SeriesRow};

/// Chunks (of up to 64 KiB) waiting for the client.
const CHUNKS_IN_FLIGHT: usize = 4;
/// Rows per batch handed from the reading thread to the formatting one.
const BATCH_ROWS: usize = 1024;
/// Batches in flight between the two threads.
const BATCHES_IN_FLIGHT: usize = 4;

/// Rows of one series, in the order read.
pub(super) struct Batch<T> {
    pub series: Arc<SeriesRow>,
    pub rows: Vec<T>,
}

/// The batches a formatter receives, until the reader is done.
pub(super) type Batches<T> = Receiver<Batch<T>>;

/// What a reader calls with each row; breaks once the formatter stopped.
pub(super) type Visit<'a, T> = &'a mut dyn FnMut(&SeriesRow, T) -> ControlFlow<()>;

/// Answers 404 for an unknown device, else streams the page: `read` visits the rows of
/// `query` and returns where the next page starts; `format` writes the JSON array of them to
/// the sink it is given and hands the sink back.
pub(super) async fn stream_json<T, R, F>(
    api: &Api,
    query: SeriesQuery,
    read: R,
    format: F,
) -> Result<Response, ApiError>
where
    T: Send + 'static,
    R: FnOnce(
            &rusqlite::Connection,
            &SeriesQuery,
            Visit<'_, T>,
        ) -> Result<Option<Cursor>, StorageError>
        + Send
        + 'static,
    F: FnOnce(Batches<T>, ChunkSink) -> std::io::Result<ChunkSink> + Send + 'static,
{
    let device = query.device.clone();
    let metric = query.metric.clone();
    api.store
        .run(move |conn| read::series_of(conn, &device, metric.as_deref()))
        .await?;
    let (chunks, body) = mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    // Set once the page's last byte is handed over: a body that ends without it is cut
    // short (the query failed, or the client stalled), and ends with an error, so the
    // client cannot take a truncated page for a whole one.
    let complete = Arc::new(AtomicBool::new(false));
    let store = api.store.clone();
    let sink = ChunkSink::new(chunks, api.send_timeout);
    let done = complete.clone();
    api.tasks.spawn(async move {
        let outcome = store
            .run(move |conn| {
                let mut sink = sink;
                let head = format!("{{\"device\":{},\"rows\":", json_string(&query.device));
                if sink.write_all(head.as_bytes()).is_err() {
                    return Ok(());
                }
                let (next, sink) = read_and_format(conn, &query, read, format, sink);
                let next = next?;
                match sink {
                    Ok(mut sink) => {
                        let next = next.map_or("null".into(), |c| json_string(&c.to_string()));
                        let end = format!(",\"next_cursor\":{next}}}");
                        if sink.write_all(end.as_bytes()).is_ok() {
                            done.store(true, Ordering::Release);
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::TimedOut => {
                        tracing::info!(error = %err, "Response cut off; its query stopped");
                    }
                    // The client went away.
                    Err(_) => {}
                }
                Ok(())
            })
            .await;
        if let Err(err) = outcome {
            tracing::warn!(error = %err, "Streamed query failed; response cut short");
        }
    });
    let stream =
        futures_util::stream::unfold((body, Some(complete)), |(mut body, complete)| async move {
            match body.recv().await {
                Some(chunk) => Some((Ok(chunk), (body, complete))),
                None => {
                    let whole = complete.as_ref()?.load(Ordering::Acquire);
                    (!whole).then(|| {
                        let cut = std::io::Error::other("the page was cut short");
                        (Err(cut), (body, None))
                    })
                }
            }
        });
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Calls `row` with every row of `batches`, in order, until it breaks.
pub(super) fn for_each_row<T>(
    batches: Batches<T>,
    mut row: impl FnMut(&SeriesRow, &T) -> ControlFlow<()>,
) {
    for batch in batches {
        for r in &batch.rows {
            if row(&batch.series, r).is_break() {
                return;
            }
        }
    }
}

/// Runs `read` on this thread and `format` on a scoped thread beside it.
fn read_and_format<T, R, F>(
    conn: &rusqlite::Connection,
    query: &SeriesQuery,
    read: R,
    format: F,
    sink: ChunkSink,
) -> (
    Result<Option<Cursor>, StorageError>,
    std::io::Result<ChunkSink>,
)
where
    T: Send,
    R: FnOnce(
        &rusqlite::Connection,
        &SeriesQuery,
        Visit<'_, T>,
    ) -> Result<Option<Cursor>, StorageError>,
    F: FnOnce(Batches<T>, ChunkSink) -> std::io::Result<ChunkSink> + Send,
{
    let (batches, received) = sync_channel(BATCHES_IN_FLIGHT);
    std::thread::scope(|scope| {
        let formatting = scope.spawn(move || format(received, sink));
        let mut batcher = Batcher {
            out: batches,
            current: None,
        };
        let next = read(conn, query, &mut |series, row| batcher.push(series, row));
        // Hands over the last batch and closes the channel: the formatter then finishes.
        batcher.finish();
        // A panic while formatting aborts the response, as one while reading does, rather
        // than ending it as if the client had gone.
        let sink = formatting
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (next, sink)
    })
}

/// Gathers visited rows into batches for the formatting thread.
struct Batcher<T> {
    out: SyncSender<Batch<T>>,
    current: Option<Batch<T>>,
}

impl<T> Batcher<T> {
    fn push(&mut self, series: &SeriesRow, row: T) -> ControlFlow<()> {
        let new_batch = self
            .current
            .as_ref()
            .is_none_or(|b| b.series.id != series.id || b.rows.len() >= BATCH_ROWS);
        if new_batch {
            self.start_batch(series)?;
        }
        if let Some(batch) = &mut self.current {
            batch.rows.push(row);
        }
        ControlFlow::Continue(())
    }

    /// Hands over the current batch, if any, and starts one for `series`.
    fn start_batch(&mut self, series: &SeriesRow) -> ControlFlow<()> {
        let series = match self.current.take() {
            Some(done) => {
                let next = if done.series.id == series.id {
                    done.series.clone()
                } else {
                    Arc::new(series.clone())
                };
                if self.out.send(done).is_err() {
                    return ControlFlow::Break(());
                }
                next
            }
            None => Arc::new(series.clone()),
        };
        self.current = Some(Batch {
            series,
            rows: Vec::with_capacity(BATCH_ROWS),
        });
        ControlFlow::Continue(())
    }

    fn finish(mut self) {
        if let Some(batch) = self.current.take() {
            let _ = self.out.send(batch);
        }
    }
}

/// A response body fed from a blocking thread: every write goes out as one chunk. A client
/// that went away, or that has taken nothing for the send timeout while the chunks in
/// flight wait, fails the write, which stops the query and releases its read snapshot.
///
/// A page as a whole must go out within [`PAGE_TIMEOUTS`] send timeouts: a client that
/// takes a little now and then would otherwise hold the query, its read connection (one of
/// four) and its snapshot for as long as it likes.
pub(super) struct ChunkSink {
    chunks: mpsc::Sender<Bytes>,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    deadline: tokio::time::Instant,
}

/// How many send timeouts one page may take in all (a minute by default; a page of the
/// largest size takes well under a second to a client that reads).
const PAGE_TIMEOUTS: u32 = 6;

impl ChunkSink {
    /// Made on the runtime, used on a blocking thread.
    fn new(chunks: mpsc::Sender<Bytes>, timeout: Duration) -> Self {
        Self {
            chunks,
            runtime: tokio::runtime::Handle::current(),
            timeout,
            deadline: tokio::time::Instant::now() + timeout * PAGE_TIMEOUTS,
        }
    }
}

impl Write for ChunkSink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let send = self.chunks.send(Bytes::copy_from_slice(buf));
        let stall = tokio::time::Instant::now() + self.timeout;
        let until = stall.min(self.deadline);
        // The timer is made inside `block_on`, on the runtime: the formatting thread is not.
        match self
            .runtime
            .block_on(async move { tokio::time::timeout_at(until, send).await })
        {
            Ok(Ok(())) => Ok(buf.len()),
            Ok(Err(_)) => Err(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "client went away",
            )),
            Err(_) if until == stall => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took no data for {:?} (http.send_timeout)",
                    self.timeout
                ),
            )),
            Err(_) => Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "the client took longer than {:?} for the page ({PAGE_TIMEOUTS} times \
                     http.send_timeout)",
                    self.timeout * PAGE_TIMEOUTS
                ),
            )),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    fn series(id: i64) -> SeriesRow {
        SeriesRow {
            id,
            metric: format!("m{id}"),
            unit: None,
        }
    }

    fn sink() -> ChunkSink {
        static RUNTIME: std::sync::OnceLock<tokio::runtime::Runtime> = std::sync::OnceLock::new();
        let runtime = RUNTIME.get_or_init(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a runtime")
        });
        ChunkSink {
            chunks: mpsc::channel(1).0,
            runtime: runtime.handle().clone(),
            timeout: Duration::from_secs(1),
            deadline: tokio::time::Instant::now() + Duration::from_secs(6),
        }
    }

    fn query() -> SeriesQuery {
        SeriesQuery {
            device: "d".into(),
            metric: None,
            range: read::Range {
                from: 0,
                to: 1,
                limit: 1,
            },
            after: None,
        }
    }

    #[test]
    fn every_row_reaches_the_formatter_in_order_in_batches_of_one_series() -> TestResult {
        let conn = rusqlite::Connection::open_in_memory()?;
        let shape = [(1, 2_500), (2, 1), (3, BATCH_ROWS)];
        let (next, formatted) = read_and_format(
            &conn,
            &query(),
            |_, _, visit| {
                for (id, rows) in shape {
                    for row in 0..rows {
                        assert!(visit(&series(id), (id, row)).is_continue());
                    }
                }
                Ok(None)
            },
            |batches, sink| {
                let mut seen = Vec::new();
                for batch in batches {
                    assert!(!batch.rows.is_empty() && batch.rows.len() <= BATCH_ROWS);
                    for (id, row) in batch.rows {
                        assert_eq!(id, batch.series.id, "a batch holds one series");
                        seen.push((id, row));
                    }
                }
                let want: Vec<(i64, usize)> = shape
                    .iter()
                    .flat_map(|&(id, rows)| (0..rows).map(move |row| (id, row)))
                    .collect();
                assert_eq!(seen, want);
                Ok(sink)
            },
            sink(),
        );
        assert!(next?.is_none());
        assert!(formatted.is_ok());
        Ok(())
    }

    #[test]
    fn a_panic_while_formatting_is_not_taken_for_a_client_that_left() -> TestResult {
        let conn = rusqlite::Connection::open_in_memory()?;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            read_and_format(
                &conn,
                &query(),
                |_, _, visit| {
                    let _ = visit(&series(1), 1);
                    Ok(None)
                },
                |_: Batches<i32>, _sink| panic!("a bug while formatting"),
                sink(),
            )
        }));
        assert!(outcome.is_err(), "the panic must reach the caller");
        Ok(())
    }

    /// Writes come from blocking and scoped threads, outside the runtime.
    #[test]
    fn a_sink_nobody_reads_fails_at_its_timeout_on_any_thread() -> TestResult {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()?;
        let (chunks, _unread) = mpsc::channel(1);
        let mut sink = ChunkSink {
            chunks,
            runtime: runtime.handle().clone(),
            timeout: Duration::from_millis(200),
            deadline: tokio::time::Instant::now() + Duration::from_secs(60),
        };
        let kind = std::thread::spawn(move || {
            sink.write_all(b"fits").map_err(|e| e.kind())?;
            sink.write_all(b"waits").map_err(|e| e.kind())
        })
        .join()
        .map_err(|_| "the writing thread panicked")?;
        assert_eq!(kind, Err(std::io::ErrorKind::TimedOut));
        Ok(())
    }

    /// A client that takes a chunk now and then, never stalling for a whole send timeout,
    /// still gets the page cut off at its deadline.
    #[test]
    fn a_page_taken_slowly_ends_at_its_deadline() -> TestResult {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_time()
            .build()?;
        let (chunks, mut taken) = mpsc::channel(1);
        let mut sink = ChunkSink {
            chunks,
            runtime: runtime.handle().clone(),
            timeout: Duration::from_millis(300),
            deadline: tokio::time::Instant::now() + Duration::from_millis(1000),
        };
        runtime.spawn(async move {
            while taken.recv().await.is_some() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
        let started = std::time::Instant::now();
        let err = std::thread::spawn(move || {
            loop {
                if let Err(err) = sink.write_all(b"chunk") {
                    return err;
                }
            }
        })
        .join()
        .map_err(|_| "the writing thread panicked")?;
        assert_eq!(err.kind(), std::io::ErrorKind::TimedOut);
        assert!(err.to_string().contains("for the page"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
        Ok(())
    }

    #[test]
    fn a_formatter_that_stops_stops_the_reader() -> TestResult {
        let conn = rusqlite::Connection::open_in_memory()?;
        let (next, formatted) = read_and_format(
            &conn,
            &query(),
            |_, _, visit| {
                let one = series(1);
                let mut visited = 0;
                while visit(&one, visited).is_continue() {
                    visited += 1;
                    assert!(visited < 1_000_000, "the reader never stopped");
                }
                // What was read is bounded by the batches in flight.
                assert!(
                    visited <= (BATCHES_IN_FLIGHT + 2) * BATCH_ROWS,
                    "{visited} read"
                );
                Ok(None)
            },
            |batches: Batches<usize>, _sink| {
                let _first = batches.recv();
                Err(std::io::Error::new(
                    std::io::ErrorKind::BrokenPipe,
                    "client went away",
                ))
            },
            sink(),
        );
        assert!(next?.is_none());
        assert!(formatted.is_err());
        Ok(())
    }
}
