-- The sync ledger (eventual-upsert), schema version 1, created in the ledger's own schema (the migration runs with
-- search_path set to it). Records are addressed as (table, key) where key is the canonical JSON of the record's
-- `Key`; every time is Unix milliseconds. Text keys use the "C" collation: byte order, as every ledger sorts.

-- Marks the schema as a ledger: a schema without it (and with other tables) is refused.
CREATE TABLE ledger_info (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    application TEXT NOT NULL
);
INSERT INTO ledger_info (id, application) VALUES (1, 'eventual-upsert ledger');

CREATE TABLE processed (
    event_id TEXT COLLATE "C" PRIMARY KEY,
    settled_at_ms BIGINT NOT NULL
);
CREATE INDEX processed_by_age ON processed (settled_at_ms);

CREATE TABLE applied_versions (
    source TEXT COLLATE "C" NOT NULL,
    record_table TEXT COLLATE "C" NOT NULL,
    record_key TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    deleted BOOLEAN NOT NULL,
    PRIMARY KEY (source, record_table, record_key)
);

CREATE TABLE id_map (
    source TEXT COLLATE "C" NOT NULL,
    source_table TEXT COLLATE "C" NOT NULL,
    source_key TEXT COLLATE "C" NOT NULL,
    target_table TEXT NOT NULL,
    target_key TEXT NOT NULL,
    PRIMARY KEY (source, source_table, source_key)
);

CREATE TABLE own_writes (
    instance TEXT COLLATE "C" NOT NULL,
    record_table TEXT COLLATE "C" NOT NULL,
    record_key TEXT COLLATE "C" NOT NULL,
    version BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    PRIMARY KEY (instance, record_table, record_key, version)
);
CREATE INDEX own_writes_by_age ON own_writes (at_ms);

CREATE TABLE checkpoints (
    source TEXT COLLATE "C" PRIMARY KEY,
    token TEXT NOT NULL,
    updated_ms BIGINT NOT NULL
);

CREATE TABLE dead_letters (
    event_id TEXT COLLATE "C" PRIMARY KEY,
    event TEXT NOT NULL,
    error TEXT NOT NULL,
    retryable BOOLEAN NOT NULL,
    attempts BIGINT NOT NULL,
    correlation_id TEXT NOT NULL,
    first_failed_ms BIGINT NOT NULL,
    last_failed_ms BIGINT NOT NULL
);
CREATE INDEX dead_letters_oldest_first ON dead_letters (first_failed_ms, event_id);

CREATE TABLE tasks (
    id TEXT COLLATE "C" PRIMARY KEY,
    handler TEXT NOT NULL,
    record_table TEXT COLLATE "C" NOT NULL,
    record_key TEXT COLLATE "C" NOT NULL,
    payload TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts BIGINT NOT NULL,
    due_ms BIGINT NOT NULL,
    last_error TEXT,
    created_ms BIGINT NOT NULL,
    updated_ms BIGINT NOT NULL
);
CREATE INDEX tasks_due ON tasks (status, due_ms);
CREATE INDEX tasks_by_record ON tasks (record_table, record_key);
CREATE INDEX tasks_oldest_first ON tasks (created_ms, id);

-- Running totals: one row per `SyncStats` counter that was ever non-zero (row locks per counter; workers add in
-- one fixed order).
CREATE TABLE totals (
    name TEXT COLLATE "C" PRIMARY KEY,
    value BIGINT NOT NULL
);
