-- Devices as configured, with their last known state and running counters.
CREATE TABLE devices (
    id          INTEGER PRIMARY KEY,
    name        TEXT    NOT NULL UNIQUE,
    kind        TEXT    NOT NULL,
    state       TEXT    NOT NULL DEFAULT 'starting',
    state_since INTEGER,
    last_error  TEXT,
    last_seen   INTEGER,
    readings    INTEGER NOT NULL DEFAULT 0,
    rejections  INTEGER NOT NULL DEFAULT 0,
    duplicates  INTEGER NOT NULL DEFAULT 0,
    dropped     INTEGER NOT NULL DEFAULT 0
);

-- One row per (device, metric): readings and rollups refer to it by integer key.
CREATE TABLE series (
    id        INTEGER PRIMARY KEY,
    device_id INTEGER NOT NULL REFERENCES devices (id),
    metric    TEXT    NOT NULL,
    unit      TEXT,
    UNIQUE (device_id, metric)
);

-- Raw readings. The key (series, time) makes redelivery idempotent: time is the source's
-- timestamp when it sent one, else the gateway's receive time.
-- flags: 1 = time is the receive time, 2 = source and gateway clocks disagree beyond max_skew.
CREATE TABLE readings (
    series_id   INTEGER NOT NULL,
    ts          INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    value       REAL    NOT NULL,
    flags       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (series_id, ts)
) WITHOUT ROWID;

-- Per series, window width and bucket start (all in ms): what the raw readings imply.
CREATE TABLE rollups (
    series_id INTEGER NOT NULL,
    width_ms  INTEGER NOT NULL,
    bucket    INTEGER NOT NULL,
    n         INTEGER NOT NULL,
    min_v     REAL    NOT NULL,
    max_v     REAL    NOT NULL,
    sum_v     REAL    NOT NULL,
    first_ts  INTEGER NOT NULL,
    first_v   REAL    NOT NULL,
    last_ts   INTEGER NOT NULL,
    last_v    REAL    NOT NULL,
    PRIMARY KEY (series_id, width_ms, bucket)
) WITHOUT ROWID;

-- Input that was not stored as readings, with the reason and the raw bytes.
CREATE TABLE rejections (
    id          INTEGER PRIMARY KEY,
    received_at INTEGER NOT NULL,
    device_id   INTEGER REFERENCES devices (id),
    source      TEXT    NOT NULL,
    reason      TEXT    NOT NULL,
    detail      TEXT    NOT NULL,
    raw         BLOB    NOT NULL
);
CREATE INDEX rejections_by_time ON rejections (received_at);
