-- The sync ledger (eventual-upsert), schema version 1. Records are addressed as (table, key) where key is the
-- canonical JSON of the record's `Key`; every time is Unix milliseconds.

-- Marks the file as a ledger: opening a SQLite file without it (and with other tables) is refused.
CREATE TABLE ledger_info (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    application TEXT NOT NULL
);
INSERT INTO ledger_info (id, application) VALUES (1, 'eventual-upsert ledger');

CREATE TABLE processed (
    event_id TEXT PRIMARY KEY,
    settled_at_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX processed_by_age ON processed (settled_at_ms);

CREATE TABLE applied_versions (
    source TEXT NOT NULL,
    record_table TEXT NOT NULL,
    record_key TEXT NOT NULL,
    version INTEGER NOT NULL,
    deleted INTEGER NOT NULL CHECK (deleted IN (0, 1)),
    PRIMARY KEY (source, record_table, record_key)
) WITHOUT ROWID;

CREATE TABLE id_map (
    source TEXT NOT NULL,
    source_table TEXT NOT NULL,
    source_key TEXT NOT NULL,
    target_table TEXT NOT NULL,
    target_key TEXT NOT NULL,
    PRIMARY KEY (source, source_table, source_key)
) WITHOUT ROWID;

CREATE TABLE own_writes (
    instance TEXT NOT NULL,
    record_table TEXT NOT NULL,
    record_key TEXT NOT NULL,
    version INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    PRIMARY KEY (instance, record_table, record_key, version)
) WITHOUT ROWID;
CREATE INDEX own_writes_by_age ON own_writes (at_ms);

CREATE TABLE checkpoints (
    source TEXT PRIMARY KEY,
    token TEXT NOT NULL,
    updated_ms INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE dead_letters (
    event_id TEXT PRIMARY KEY,
    event TEXT NOT NULL,
    error TEXT NOT NULL,
    retryable INTEGER NOT NULL CHECK (retryable IN (0, 1)),
    attempts INTEGER NOT NULL,
    correlation_id TEXT NOT NULL,
    first_failed_ms INTEGER NOT NULL,
    last_failed_ms INTEGER NOT NULL
);
CREATE INDEX dead_letters_oldest_first ON dead_letters (first_failed_ms, event_id);

CREATE TABLE tasks (
    id TEXT PRIMARY KEY,
    handler TEXT NOT NULL,
    record_table TEXT NOT NULL,
    record_key TEXT NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    due_ms INTEGER NOT NULL,
    last_error TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE INDEX tasks_due ON tasks (status, due_ms);
CREATE INDEX tasks_by_record ON tasks (record_table, record_key);
CREATE INDEX tasks_oldest_first ON tasks (created_ms, id);

-- Running totals: one row per `SyncStats` counter that was ever non-zero.
CREATE TABLE totals (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
