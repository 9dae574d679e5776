//! Multi-row statements: one `INSERT ... VALUES (..), (..), ..` carries many rows.
//!
//! Each statement is a round trip to sqlx's worker thread, and one row per statement is
//! about 100 times slower than a thousand. Rows go in chunks of [`CHUNK_SIZES`] only, and
//! each statement's text is made once per chunk size: sqlx finds it prepared in its
//! statement cache, and nothing formats a placeholder per row.

use std::sync::{Arc, OnceLock};

use sqlx::error::BoxDynError;
use sqlx::query::Query;
use sqlx::sqlite::SqliteArguments;
use sqlx::{Arguments as _, AssertSqlSafe, Encode, Sqlite, Type};

/// Rows per statement, largest first. Powers of two, so a batch below 1024 rows takes at
/// most one statement per set bit of its size, and a few shapes per statement stay prepared.
pub const CHUNK_SIZES: [usize; 11] = [1024, 512, 256, 128, 64, 32, 16, 8, 4, 2, 1];

/// `items` in chunks of [`CHUNK_SIZES`], largest first.
pub fn chunks<T>(items: &[T]) -> impl Iterator<Item = &[T]> {
    let mut rest = items;
    std::iter::from_fn(move || {
        let size = CHUNK_SIZES.into_iter().find(|&size| size <= rest.len())?;
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
    fn text(&self, rows: usize) -> Arc<str> {
        match CHUNK_SIZES.iter().position(|&size| size == rows) {
            Some(slot) => self.texts[slot]
                .get_or_init(|| self.make_text(rows))
                .clone(),
            // Not a chunk size: correct, only not cached.
            None => self.make_text(rows),
        }
    }

    fn make_text(&self, rows: usize) -> Arc<str> {
        let group = format!("({})", vec!["?"; self.columns].join(", "));
        let values = vec![group.as_str(); rows].join(", ");
        Arc::from(format!("{} VALUES {values}{}", self.head, self.tail))
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
    }
}
