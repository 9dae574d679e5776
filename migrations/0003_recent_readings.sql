-- Readings land in two tables, and `readings` is the view of both.
--
-- Keyed by series, a commit of readings from 200 series rewrites at least 200 pages (the
-- last leaf of each series): kilobytes of WAL per reading, which costs commit latency and
-- wears SD cards. So each commit appends to `readings_recent`, keyed by time, where one
-- commit's readings share a few pages; the writer moves them into `readings_archive`,
-- keyed by series for range queries, in bulk once enough have gathered.
--
-- A key (series, time) is in at most one of the two tables: the writer inserts a reading
-- into `readings_recent` only if `readings_archive` does not hold its key, and moves rows
-- in one transaction.
ALTER TABLE readings RENAME TO readings_archive;

CREATE TABLE readings_recent (
    ts          INTEGER NOT NULL,
    series_id   INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    value       REAL    NOT NULL,
    flags       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (ts, series_id)
) WITHOUT ROWID;

CREATE VIEW readings (series_id, ts, received_at, value, flags) AS
    SELECT series_id, ts, received_at, value, flags FROM readings_archive
    UNION ALL
    SELECT series_id, ts, received_at, value, flags FROM readings_recent;
