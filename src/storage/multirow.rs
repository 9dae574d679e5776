//! Multi-row statements: one `INSERT ... VALUES (..), (..), ..` carries many rows.
//!
//! Each query is a round trip to sqlx's worker thread, and one row per statement is about
//! 100 times slower than a thousand. Readings, most of the rows, skip sqlx (`direct`) but
//! use the same statement texts, one statement at a time ([`statement_chunks`]). Rows go in chunks of [`CHUNK_SIZES`] only, and each
//! query's text is made once per chunk size: sqlx finds it prepared in its statement cache,
//! and nothing formats a placeholder per row. The largest chunk is several statements of
//! [`ROWS_PER_STATEMENT`] rows in one query, which sqlx's worker runs one after the other
//! without coming back: the worker thread waits for the writer task once per query, and
//! under load the writer task waits its turn on a busy runtime thread.

use std::sync::{Arc, OnceLock};

use sqlx::error::BoxDynError;
use sqlx::query::Query;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments as _, AssertSqlSafe, Encode, Sqlite, Type};

/// The most rows one statement carries.
pub const ROWS_PER_STATEMENT: usize = 1024;
/// Statements in the largest query.
const STATEMENTS_PER_QUERY: usize = 4;
/// Rows per query, largest first: four statements of [`ROWS_PER_STATEMENT`] rows, then one
/// statement of a power of two, so a rest below 4096 rows takes at most three 1024-row
/// queries and one per set bit below that, and a few shapes stay prepared. (Four statements
/// per query against one: ingest rate +2 to 4 % at QoS 0, `cargo bench --bench ingest`
/// with `BENCH_BASELINE`.)
pub const CHUNK_SIZES: [usize; 12] = [
    STATEMENTS_PER_QUERY * ROWS_PER_STATEMENT,
    1024,
    512,
    256,
    128,
    64,
    32,
    16,
    8,
    4,
    2,
    1,
];

/// `items` in chunks of [`CHUNK_SIZES`], largest first.
pub fn chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    chunked(items, usize::MAX)
}

/// `items` in chunks of one statement each: the sizes of [`CHUNK_SIZES`] up to
/// [`ROWS_PER_STATEMENT`], for statements prepared through SQLite's own API, which takes
/// one statement at a time.
pub fn statement_chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    chunked(items, ROWS_PER_STATEMENT)
}

/// `items` in chunks of [`CHUNK_SIZES`] up to `max`, largest first.
fn chunked<T>(items: &[T], max: usize) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        let size = CHUNK_SIZES
            .into_iter()
            .find(|&size| size <= max && size <= rest.len())?;
        let (chunk, tail) = rest.split_at(size);
        rest = tail;
        Some(chunk)
    })
}

/// A statement of the shape `head VALUES (?, ..), (?, ..) tail`, `columns` values a row.
pub struct MultiRow {
    head: &'static str,
    columns: usize,
    tail: &'static str,
    /// The text for each of [`CHUNK_SIZES`], made when first used.
    texts: [OnceLock<Arc<str>>; CHUNK_SIZES.len()],
}

impl MultiRow {
    pub const fn new(head: &'static str, columns: usize, tail: &'static str) -> Self {
        Self {
            head,
            columns,
            tail,
            texts: [const { OnceLock::new() }; CHUNK_SIZES.len()],
        }
    }

    /// The statement for `rows`, each bound by `bind` in column order.
    ///
    /// # Errors
    /// When a value cannot be encoded.
    pub fn query<'r, T>(
        &self,
        rows: &'r [T],
        mut bind: impl FnMut(&mut Binder, &'r T),
    ) -> Result<Query<'static, Sqlite, SqliteArguments>, sqlx::Error> {
        let mut binder = Binder {
            args: SqliteArguments::default(),
            error: None,
        };
        binder.args.reserve(rows.len() * self.columns, 0);
        for row in rows {
            bind(&mut binder, row);
        }
        if let Some(err) = binder.error {
            return Err(sqlx::Error::Encode(err));
        }
        Ok(sqlx::query_with(
            AssertSqlSafe(self.text(rows.len())),
            binder.args,
        ))
    }

    /// The statement's text for `rows` rows: only placeholders are generated, never values.
    pub fn text(&self, rows: usize) -> Arc<str> {
        match CHUNK_SIZES.iter().position(|&size| size == rows) {
            Some(slot) => self.texts[slot]
                .get_or_init(|| self.make_text(rows))
                .clone(),
            // Not a chunk size: correct, only not cached.
            None => self.make_text(rows),
        }
    }

    /// `rows` rows as statements of at most [`ROWS_PER_STATEMENT`] rows each.
    fn make_text(&self, rows: usize) -> Arc<str> {
        let group = format!("({})", vec!["?"; self.columns].join(", "));
        let statement = |rows: usize| {
            let values = vec![group.as_str(); rows].join(", ");
            format!("{} VALUES {values}{}", self.head, self.tail)
        };
        let mut statements = vec![statement(ROWS_PER_STATEMENT); rows / ROWS_PER_STATEMENT];
        if !rows.is_multiple_of(ROWS_PER_STATEMENT) {
            statements.push(statement(rows % ROWS_PER_STATEMENT));
        }
        Arc::from(statements.join(";\n"))
    }
}

/// Collects one statement's values, keeping the first that cannot be encoded.
pub struct Binder {
    args: SqliteArguments,
    error: Option<BoxDynError>,
}

impl Binder {
    pub fn bind<'q, T: Encode<'q, Sqlite> + Type<Sqlite>>(&mut self, value: T) -> &mut Self {
        if self.error.is_none()
            && let Err(err) = self.args.add(value)
        {
            self.error = Some(err);
        }
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_use_only_the_fixed_sizes_and_cover_everything() {
        for n in [0, 1, 15, 16, 17, 1000, 1024, 2500, 10_000] {
            let items: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = chunks(&items).collect();
            assert!(parts.iter().all(|p| CHUNK_SIZES.contains(&p.len())), "{n}");
            assert_eq!(parts.concat(), items, "{n}");
        }
        // 2500 = 2 × 1024 + 256 + 128 + 64 + 4
        assert_eq!(chunks(&[0u8; 2500]).count(), 2 + 4);
        // 10000 = 2 × 4096 + 1024 + 512 + 256 + 16
        assert_eq!(chunks(&[0u8; 10_000]).count(), 2 + 4);
        for n in [0, 1, 1000, 1024, 2500] {
            let items: Vec<usize> = (0..n).collect();
            let parts: Vec<&[usize]> = statement_chunks(&items).collect();
            assert!(parts.iter().all(|p| p.len() <= ROWS_PER_STATEMENT), "{n}");
            assert_eq!(parts.concat(), items, "{n}");
        }
        // 2500 = 2 × 1024 + 256 + 128 + 64 + 4
        assert_eq!(statement_chunks(&[0u8; 2500]).count(), 2 + 4);
    }

    #[test]
    fn statement_text_has_one_placeholder_group_per_row() {
        let statement = MultiRow::new("INSERT INTO t (a, b)", 2, " ON CONFLICT DO NOTHING");
        assert_eq!(
            &*statement.text(2),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?) ON CONFLICT DO NOTHING"
        );
        assert_eq!(
            &*statement.text(3),
            "INSERT INTO t (a, b) VALUES (?, ?), (?, ?), (?, ?) ON CONFLICT DO NOTHING"
        );
        assert!(Arc::ptr_eq(&statement.text(2), &statement.text(2)));
        let grouped = statement.text(4096);
        let parts: Vec<&str> = grouped.split(";\n").collect();
        assert_eq!(parts.len(), 4);
        assert!(parts.iter().all(|p| **p == *statement.text(1024)));
    }

    /// A query of several statements reports the rows of all of them, as the writer's
    /// counters and rollups need.
    #[tokio::test]
    async fn a_query_of_several_statements_counts_and_returns_every_row() {
        use sqlx::{Connection as _, SqliteConnection};
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (a INTEGER PRIMARY KEY, b INTEGER NOT NULL)")
            .execute(&mut conn)
            .await
            .unwrap();
        let insert = MultiRow::new("INSERT INTO t (a, b)", 2, " ON CONFLICT DO NOTHING");
        let returning = MultiRow::new(
            "INSERT INTO t (a, b)",
            2,
            " ON CONFLICT DO NOTHING RETURNING a",
        );
        let bind = |row: &mut Binder, a: &i64| {
            row.bind(*a).bind(a * 2);
        };
        let rows: Vec<i64> = (0..6000).collect();
        let mut inserted = 0;
        for chunk in chunks(&rows) {
            inserted += insert
                .query(chunk, bind)
                .unwrap()
                .execute(&mut conn)
                .await
                .unwrap()
                .rows_affected();
        }
        assert_eq!(inserted, 6000);
        // Half of these exist already: only the new ones are counted and named.
        let rows: Vec<i64> = (3000..9000).collect();
        let mut named = Vec::new();
        for chunk in chunks(&rows) {
            let found: Vec<i64> = returning
                .query(chunk, bind)
                .unwrap()
                .fetch_all(&mut conn)
                .await
                .unwrap()
                .iter()
                .map(|row| sqlx::Row::get(row, 0))
                .collect();
            named.extend(found);
        }
        named.sort_unstable();
        assert_eq!(named, (6000..9000).collect::<Vec<i64>>());
    }
}
