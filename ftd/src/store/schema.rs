//! The database's schema, as numbered migrations. `PRAGMA user_version`
//! holds how many have run; each runs in its own transaction.

/// Migration `i` takes the schema from version `i` to `i + 1`.
pub const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    r#"
    CREATE TABLE meta (
        key   TEXT PRIMARY KEY,
        value TEXT NOT NULL
    );
    CREATE TABLE nodes (
        name              TEXT PRIMARY KEY,
        last_seen_unix_ms INTEGER
    );
    CREATE TABLE vms (
        name            TEXT PRIMARY KEY,
        definition      TEXT NOT NULL,      -- JSON of model::VmDefinition
        desired         TEXT NOT NULL CHECK (desired IN ('running', 'stopped')),
        primary_node    TEXT,
        generation      INTEGER NOT NULL DEFAULT 0,
        revision        INTEGER NOT NULL,   -- bumped at every change
        created_unix_ms INTEGER NOT NULL,
        updated_unix_ms INTEGER NOT NULL
    );
    CREATE TABLE events (
        id       INTEGER PRIMARY KEY AUTOINCREMENT,
        unix_ms  INTEGER NOT NULL,
        node     TEXT NOT NULL,
        severity TEXT NOT NULL CHECK (severity IN ('info', 'warning', 'critical')),
        alert    INTEGER NOT NULL,
        kind     TEXT NOT NULL,
        vm       TEXT,
        message  TEXT NOT NULL
    );
    CREATE INDEX events_vm ON events (vm, id);
    CREATE TABLE audit (
        id      INTEGER PRIMARY KEY AUTOINCREMENT,
        unix_ms INTEGER NOT NULL,
        node    TEXT NOT NULL,
        who     TEXT NOT NULL,
        action  TEXT NOT NULL,
        status  INTEGER NOT NULL,
        result  TEXT NOT NULL
    );
    "#,
    // 2: deleted VMs, so that a delete reaches a peer that was away.
    r#"
    CREATE TABLE tombstones (
        name       TEXT PRIMARY KEY,
        generation INTEGER NOT NULL,
        revision   INTEGER NOT NULL,
        unix_ms    INTEGER NOT NULL
    );
    "#,
    // 3: node maintenance, a record that travels between the nodes.
    r#"
    ALTER TABLE nodes ADD COLUMN maintenance TEXT NOT NULL DEFAULT 'off'
        CHECK (maintenance IN ('off', 'entering', 'on', 'leaving'));
    ALTER TABLE nodes ADD COLUMN maintenance_by TEXT;
    ALTER TABLE nodes ADD COLUMN maintenance_since_unix_ms INTEGER;
    ALTER TABLE nodes ADD COLUMN revision INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE nodes ADD COLUMN updated_unix_ms INTEGER NOT NULL DEFAULT 0;
    "#,
    // 4: the web console's users (their passwords hashed; a deleted user
    // keeps its row, without a hash, so that the delete travels).
    r#"
    CREATE TABLE users (
        name            TEXT PRIMARY KEY,
        password_hash   TEXT,
        revision        INTEGER NOT NULL,
        updated_unix_ms INTEGER NOT NULL
    );
    "#,
    // 5: each node's event and audit logs hold both nodes' entries. An
    // entry from the peer keeps the identity of the log that made it (the
    // peer's `log_id`, made here with each database) and its number there,
    // so that it is stored once however often it comes; this node's own
    // entries have neither. What a node logged before this version stays
    // its own (`*_shared_after`): the peer is not flooded with a history
    // as if it were new.
    r#"
    INSERT INTO meta (key, value) VALUES ('log_id', lower(hex(randomblob(16))));
    INSERT INTO meta (key, value) SELECT 'events_shared_after', COALESCE(MAX(id), 0) FROM events;
    INSERT INTO meta (key, value) SELECT 'audit_shared_after', COALESCE(MAX(id), 0) FROM audit;
    ALTER TABLE events ADD COLUMN origin_log TEXT;
    ALTER TABLE events ADD COLUMN origin_id INTEGER;
    CREATE UNIQUE INDEX events_origin ON events (origin_log, origin_id);
    ALTER TABLE audit ADD COLUMN origin_log TEXT;
    ALTER TABLE audit ADD COLUMN origin_id INTEGER;
    CREATE UNIQUE INDEX audit_origin ON audit (origin_log, origin_id);
    "#,
];
