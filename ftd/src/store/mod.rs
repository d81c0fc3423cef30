//! The node's persistent state in SQLite (`<state dir>/ftd.sqlite`): VM
//! definitions with their desired state and placement, the event log and
//! the audit log, when the peer was last heard and whether a node is in
//! maintenance.
//!
//! SQLite (through rusqlite, built in): one file, transactions that
//! survive power loss (WAL, `synchronous=FULL`), SQL for the event log's
//! filters, and `sqlite3` at hand for an operator who wants to look
//! inside. Every write is one transaction; readers never see half a change.

mod logs;
mod nodes;
mod schema;
mod users;

pub use logs::LogMark;
pub use nodes::NodeRecord;
pub use users::UserRecord;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

use crate::model::{Desired, VmDefinition};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("cannot migrate the database {path} to schema {version}: {source}")]
    Migrate {
        path: PathBuf,
        version: usize,
        source: rusqlite::Error,
    },
    #[error("the database {path} has schema {found}, newer than this ftd knows ({known})")]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("a VM named {0:?} exists already")]
    NameInUse(String),
    #[error("no VM is named {0:?}")]
    NoSuchVm(String),
    #[error("the stored definition of VM {vm:?} is unreadable: {source}")]
    BadDefinition {
        vm: String,
        source: serde_json::Error,
    },
    #[error("database {op} failed: {source}")]
    Query {
        op: &'static str,
        source: rusqlite::Error,
    },
}

fn query(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A VM as the store keeps it (and as the pair channel carries it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmRecord {
    pub definition: VmDefinition,
    pub desired: Desired,
    /// The node that runs (or last ran) the VM as its primary.
    pub primary_node: Option<String>,
    pub generation: u64,
    /// Bumped at every change of the record.
    pub revision: u64,
    pub created_unix_ms: u64,
    pub updated_unix_ms: u64,
}

impl VmRecord {
    /// Which of two versions of a record wins: the later generation (a
    /// failover outranks any edit made on the old primary's side), then
    /// the later revision, then the later change.
    pub fn precedence(&self) -> (u64, u64, u64) {
        (self.generation, self.revision, self.updated_unix_ms)
    }
}

/// A deleted VM, kept so that the delete reaches a peer that was away.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Tombstone {
    pub name: String,
    pub generation: u64,
    pub revision: u64,
    pub unix_ms: u64,
}

impl Tombstone {
    pub fn precedence(&self) -> (u64, u64, u64) {
        (self.generation, self.revision, self.unix_ms)
    }
}

/// What merging a peer's version did here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Merged {
    /// This node's version stays.
    Kept,
    /// The VM was new here.
    Added,
    /// The peer's version replaced this node's.
    Replaced,
    /// The VM was deleted here.
    Deleted,
}

/// What `events` returns.
#[derive(Debug, Clone, Default)]
pub struct EventFilter {
    pub vm: Option<String>,
    pub alerts_only: bool,
    /// Only events with a larger id.
    pub after: Option<u64>,
    pub limit: usize,
}

/// The store, shared by the API's handlers and the supervisor.
#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
    node: String,
    /// See [`Store::log_id`].
    log_id: String,
    /// This node's own entries (events, audit) up to these numbers were
    /// logged before the logs were shared, and stay its own.
    shared_after: (u64, u64),
}

impl Store {
    /// Opens (creating if need be) the database at `path`, migrating its
    /// schema; `node` is this node's name, written into every event.
    pub fn open(path: &Path, node: &str) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let mut conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", "ON")
            .map_err(open_err)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        let meta = |key: &str| {
            conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |row| {
                row.get::<_, String>(0)
            })
        };
        // None (a database from before these keys): nothing held back.
        let number = |key: &str| {
            meta(key)
                .optional()
                .map(|v| v.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0))
        };
        let log_id = meta("log_id").map_err(open_err)?;
        let shared_after = (
            number("events_shared_after").map_err(open_err)?,
            number("audit_shared_after").map_err(open_err)?,
        );
        Ok(Store {
            conn: Arc::new(Mutex::new(conn)),
            node: node.to_string(),
            log_id,
            shared_after,
        })
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half transaction
        // behind (rusqlite rolls back on drop), so a poisoned lock is
        // still a consistent database.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Stores a new VM (desired: stopped).
    pub fn create_vm(&self, definition: &VmDefinition) -> Result<VmRecord, StoreError> {
        let json =
            serde_json::to_string(definition).map_err(|source| StoreError::BadDefinition {
                vm: definition.name.clone(),
                source,
            })?;
        let now = unix_ms();
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin create"))?;
        // A name used before starts above its tombstone, so the new VM
        // outranks the delete everywhere.
        let (generation, revision) = tx
            .query_row(
                "SELECT generation, revision FROM tombstones WHERE name = ?1",
                params![definition.name],
                |row| Ok((row.get::<_, i64>(0)?, row.get::<_, i64>(1)? + 1)),
            )
            .optional()
            .map_err(query("read tombstone"))?
            .unwrap_or((0, 1));
        let inserted = tx
            .execute(
                "INSERT INTO vms (name, definition, desired, generation, revision, created_unix_ms, updated_unix_ms)
                 VALUES (?1, ?2, 'stopped', ?3, ?4, ?5, ?5) ON CONFLICT (name) DO NOTHING",
                params![definition.name, json, generation, revision, now as i64],
            )
            .map_err(query("insert vm"))?;
        if inserted == 0 {
            return Err(StoreError::NameInUse(definition.name.clone()));
        }
        tx.execute(
            "DELETE FROM tombstones WHERE name = ?1",
            params![definition.name],
        )
        .map_err(query("drop tombstone"))?;
        tx.commit().map_err(query("commit create"))?;
        drop(conn);
        self.vm(&definition.name)
    }

    pub fn vm(&self, name: &str) -> Result<VmRecord, StoreError> {
        self.conn()
            .query_row(
                "SELECT definition, desired, primary_node, generation, revision, created_unix_ms, updated_unix_ms
                 FROM vms WHERE name = ?1",
                params![name],
                row_to_raw,
            )
            .optional()
            .map_err(query("read vm"))?
            .ok_or_else(|| StoreError::NoSuchVm(name.to_string()))?
            .into_record(name)
    }

    /// Every VM, by name.
    pub fn vms(&self) -> Result<Vec<VmRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT definition, desired, primary_node, generation, revision, created_unix_ms, updated_unix_ms, name
                 FROM vms ORDER BY name",
            )
            .map_err(query("list vms"))?;
        let rows = stmt
            .query_map([], |row| Ok((row_to_raw(row)?, row.get::<_, String>(7)?)))
            .map_err(query("list vms"))?;
        let mut out = Vec::new();
        for row in rows {
            let (raw, name) = row.map_err(query("list vms"))?;
            out.push(raw.into_record(&name)?);
        }
        Ok(out)
    }

    /// Deletes a VM, leaving a tombstone for the peer.
    pub fn delete_vm(&self, name: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin delete"))?;
        let found: Option<(i64, i64)> = tx
            .query_row(
                "SELECT generation, revision FROM vms WHERE name = ?1",
                params![name],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .optional()
            .map_err(query("read vm"))?;
        let Some((generation, revision)) = found else {
            return Err(StoreError::NoSuchVm(name.to_string()));
        };
        tx.execute("DELETE FROM vms WHERE name = ?1", params![name])
            .map_err(query("delete vm"))?;
        put_tombstone(
            &tx,
            &Tombstone {
                name: name.to_string(),
                generation: generation as u64,
                revision: revision as u64 + 1,
                unix_ms: unix_ms(),
            },
        )?;
        tx.commit().map_err(query("commit delete"))
    }

    pub fn tombstones(&self) -> Result<Vec<Tombstone>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare("SELECT name, generation, revision, unix_ms FROM tombstones ORDER BY name")
            .map_err(query("list tombstones"))?;
        let rows = stmt
            .query_map([], |row| {
                Ok(Tombstone {
                    name: row.get(0)?,
                    generation: row.get::<_, i64>(1)? as u64,
                    revision: row.get::<_, i64>(2)? as u64,
                    unix_ms: row.get::<_, i64>(3)? as u64,
                })
            })
            .map_err(query("list tombstones"))?;
        rows.collect::<Result<_, _>>()
            .map_err(query("list tombstones"))
    }

    /// Takes the peer's version of a VM if it outranks this node's (and
    /// any tombstone here).
    pub fn merge_vm(&self, remote: &VmRecord) -> Result<Merged, StoreError> {
        let name = remote.definition.name.clone();
        let json = serde_json::to_string(&remote.definition).map_err(|source| {
            StoreError::BadDefinition {
                vm: name.clone(),
                source,
            }
        })?;
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin merge"))?;
        let local = tx
            .query_row(
                "SELECT definition, desired, primary_node, generation, revision, created_unix_ms, updated_unix_ms
                 FROM vms WHERE name = ?1",
                params![name],
                row_to_raw,
            )
            .optional()
            .map_err(query("read vm"))?
            .map(|raw| raw.into_record(&name))
            .transpose()?;
        let tomb = precedence_of(
            &tx,
            "SELECT generation, revision, unix_ms FROM tombstones WHERE name = ?1",
            &name,
        )
        .map_err(query("read tombstone"))?;
        let outcome = match (&local, tomb) {
            (Some(l), _) if l.precedence() >= remote.precedence() => Merged::Kept,
            (None, Some(t)) if t >= remote.precedence() => Merged::Kept,
            (Some(_), _) => Merged::Replaced,
            (None, _) => Merged::Added,
        };
        if outcome != Merged::Kept {
            tx.execute(
                "INSERT INTO vms (name, definition, desired, primary_node, generation, revision, created_unix_ms, updated_unix_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (name) DO UPDATE SET definition = excluded.definition,
                     desired = excluded.desired, primary_node = excluded.primary_node,
                     generation = excluded.generation, revision = excluded.revision,
                     updated_unix_ms = excluded.updated_unix_ms",
                params![
                    name,
                    json,
                    remote.desired.as_str(),
                    remote.primary_node,
                    remote.generation as i64,
                    remote.revision as i64,
                    remote.created_unix_ms as i64,
                    remote.updated_unix_ms as i64
                ],
            )
            .map_err(query("merge vm"))?;
            tx.execute("DELETE FROM tombstones WHERE name = ?1", params![name])
                .map_err(query("drop tombstone"))?;
        }
        tx.commit().map_err(query("commit merge"))?;
        Ok(outcome)
    }

    /// Applies the peer's delete if it outranks this node's version.
    pub fn merge_tombstone(&self, remote: &Tombstone) -> Result<Merged, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin merge"))?;
        let local = precedence_of(
            &tx,
            "SELECT generation, revision, updated_unix_ms FROM vms WHERE name = ?1",
            &remote.name,
        )
        .map_err(query("read vm"))?;
        let outcome = match local {
            Some(l) if l >= remote.precedence() => Merged::Kept,
            Some(_) => Merged::Deleted,
            None => Merged::Kept,
        };
        if outcome == Merged::Deleted {
            tx.execute("DELETE FROM vms WHERE name = ?1", params![remote.name])
                .map_err(query("delete vm"))?;
        }
        // Keep the newest tombstone either way (it travels on).
        put_tombstone(&tx, remote)?;
        if local.is_some() && outcome == Merged::Kept {
            // The VM lives here and outranks the delete: no tombstone.
            tx.execute(
                "DELETE FROM tombstones WHERE name = ?1",
                params![remote.name],
            )
            .map_err(query("drop tombstone"))?;
        }
        tx.commit().map_err(query("commit merge"))?;
        Ok(outcome)
    }

    /// Changes a VM with `change` in one transaction; bumps its revision.
    pub fn update_vm(
        &self,
        name: &str,
        change: impl FnOnce(&mut VmRecord),
    ) -> Result<VmRecord, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin update"))?;
        let mut record = tx
            .query_row(
                "SELECT definition, desired, primary_node, generation, revision, created_unix_ms, updated_unix_ms
                 FROM vms WHERE name = ?1",
                params![name],
                row_to_raw,
            )
            .optional()
            .map_err(query("read vm"))?
            .ok_or_else(|| StoreError::NoSuchVm(name.to_string()))?
            .into_record(name)?;
        change(&mut record);
        record.revision += 1;
        record.updated_unix_ms = unix_ms();
        let json = serde_json::to_string(&record.definition).map_err(|source| {
            StoreError::BadDefinition {
                vm: name.to_string(),
                source,
            }
        })?;
        tx.execute(
            "UPDATE vms SET definition = ?2, desired = ?3, primary_node = ?4, generation = ?5,
                            revision = ?6, updated_unix_ms = ?7 WHERE name = ?1",
            params![
                name,
                json,
                record.desired.as_str(),
                record.primary_node,
                record.generation as i64,
                record.revision as i64,
                record.updated_unix_ms as i64
            ],
        )
        .map_err(query("update vm"))?;
        tx.commit().map_err(query("commit update"))?;
        Ok(record)
    }

    /// Records that `node`'s daemon was heard now.
    pub fn node_seen(&self, node: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "INSERT INTO nodes (name, last_seen_unix_ms) VALUES (?1, ?2)
                 ON CONFLICT (name) DO UPDATE SET last_seen_unix_ms = excluded.last_seen_unix_ms",
                params![node, unix_ms() as i64],
            )
            .map_err(query("record node seen"))?;
        Ok(())
    }

    /// When `node`'s daemon was last heard.
    pub fn node_last_seen(&self, node: &str) -> Result<Option<u64>, StoreError> {
        let v: Option<Option<i64>> = self
            .conn()
            .query_row(
                "SELECT last_seen_unix_ms FROM nodes WHERE name = ?1",
                params![node],
                |row| row.get(0),
            )
            .optional()
            .map_err(query("read node"))?;
        Ok(v.flatten().map(|v| v as u64))
    }
}

/// Records a delete, keeping the newest tombstone of a name (a delete
/// made here outranks any older one: its revision is past the record's).
fn put_tombstone(tx: &rusqlite::Transaction<'_>, t: &Tombstone) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO tombstones (name, generation, revision, unix_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET generation = excluded.generation,
             revision = excluded.revision, unix_ms = excluded.unix_ms
         WHERE (excluded.generation, excluded.revision, excluded.unix_ms)
             > (tombstones.generation, tombstones.revision, tombstones.unix_ms)",
        params![
            t.name,
            t.generation as i64,
            t.revision as i64,
            t.unix_ms as i64
        ],
    )
    .map_err(query("add tombstone"))?;
    Ok(())
}

/// The (generation, revision, time) of the row `sql` selects for `name`.
fn precedence_of(
    tx: &rusqlite::Transaction<'_>,
    sql: &str,
    name: &str,
) -> rusqlite::Result<Option<(u64, u64, u64)>> {
    tx.query_row(sql, params![name], |row| {
        Ok((
            row.get::<_, i64>(0)? as u64,
            row.get::<_, i64>(1)? as u64,
            row.get::<_, i64>(2)? as u64,
        ))
    })
    .optional()
}

/// A vms row before its JSON is decoded.
struct RawVm {
    definition: String,
    desired: String,
    primary_node: Option<String>,
    generation: i64,
    revision: i64,
    created: i64,
    updated: i64,
}

fn row_to_raw(row: &rusqlite::Row<'_>) -> rusqlite::Result<RawVm> {
    Ok(RawVm {
        definition: row.get(0)?,
        desired: row.get(1)?,
        primary_node: row.get(2)?,
        generation: row.get(3)?,
        revision: row.get(4)?,
        created: row.get(5)?,
        updated: row.get(6)?,
    })
}

impl RawVm {
    fn into_record(self, name: &str) -> Result<VmRecord, StoreError> {
        let definition: VmDefinition =
            serde_json::from_str(&self.definition).map_err(|source| StoreError::BadDefinition {
                vm: name.to_string(),
                source,
            })?;
        Ok(VmRecord {
            definition,
            // The CHECK constraint admits only these two.
            desired: Desired::parse(&self.desired).unwrap_or(Desired::Stopped),
            primary_node: self.primary_node,
            generation: self.generation as u64,
            revision: self.revision as u64,
            created_unix_ms: self.created as u64,
            updated_unix_ms: self.updated as u64,
        })
    }
}

fn migrate(conn: &mut Connection, path: &Path) -> Result<(), StoreError> {
    let found: usize = conn
        .pragma_query_value(None, "user_version", |row| row.get::<_, i64>(0))
        .map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })? as usize;
    let known = schema::MIGRATIONS.len();
    if found > known {
        return Err(StoreError::TooNew {
            path: path.to_path_buf(),
            found,
            known,
        });
    }
    for (i, sql) in schema::MIGRATIONS.iter().enumerate().skip(found) {
        let migrate_err = |source| StoreError::Migrate {
            path: path.to_path_buf(),
            version: i + 1,
            source,
        };
        let tx = conn.transaction().map_err(migrate_err)?;
        tx.execute_batch(sql).map_err(migrate_err)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)
            .map_err(migrate_err)?;
        tx.commit().map_err(migrate_err)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DiskSpec, Event, Level, Severity};

    fn definition(name: &str) -> VmDefinition {
        VmDefinition {
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: "/images/vmlinux".into(),
            initrd: None,
            cmdline: "console=ttyS0".into(),
            disks: vec![DiskSpec {
                size_mib: Some(16),
                image: None,
            }],
            nics: vec!["52:54:00:00:00:01".into()],
            level: Level::Ft,
            preferred_node: "node-a".into(),
            ft: Default::default(),
            slot: 0,
        }
    }

    #[test]
    fn a_vm_survives_reopening_the_database() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ftd.sqlite");
        {
            let store = Store::open(&path, "node-a").unwrap();
            store.create_vm(&definition("vm1")).unwrap();
            store
                .update_vm("vm1", |r| {
                    r.desired = Desired::Running;
                    r.primary_node = Some("node-a".into());
                    r.generation = 3;
                })
                .unwrap();
            store
                .add_event(Severity::Critical, true, "vm", Some("vm1"), "lost")
                .unwrap();
            store
                .add_audit("admin@127.0.0.1", "POST /api/vms", 201, "created")
                .unwrap();
        }
        let store = Store::open(&path, "node-a").unwrap();
        let vm = store.vm("vm1").unwrap();
        assert_eq!(vm.definition, definition("vm1"));
        assert_eq!(vm.desired, Desired::Running);
        assert_eq!(vm.primary_node.as_deref(), Some("node-a"));
        assert_eq!(vm.generation, 3);
        assert_eq!(vm.revision, 2);
        let events = store
            .events(&EventFilter {
                alerts_only: true,
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].message, "lost");
        assert_eq!(store.audit(10).unwrap()[0].status, 201);
    }

    #[test]
    fn a_name_in_use_and_an_unknown_name_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), "node-a").unwrap();
        store.create_vm(&definition("vm1")).unwrap();
        assert!(matches!(
            store.create_vm(&definition("vm1")),
            Err(StoreError::NameInUse(_))
        ));
        assert!(matches!(store.vm("nope"), Err(StoreError::NoSuchVm(_))));
        assert!(matches!(
            store.delete_vm("nope"),
            Err(StoreError::NoSuchVm(_))
        ));
        assert!(matches!(
            store.update_vm("nope", |_| {}),
            Err(StoreError::NoSuchVm(_))
        ));
        store.delete_vm("vm1").unwrap();
        assert!(store.vms().unwrap().is_empty());
    }

    #[test]
    fn events_filter_and_page() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db"), "node-a").unwrap();
        for i in 0..10 {
            let vm = if i % 2 == 0 { "even" } else { "odd" };
            store
                .add_event(Severity::Info, i == 9, "vm", Some(vm), &format!("e{i}"))
                .unwrap();
        }
        let f = |vm: Option<&str>, alerts_only, after, limit| EventFilter {
            vm: vm.map(str::to_string),
            alerts_only,
            after,
            limit,
        };
        let msgs = |events: Vec<Event>| events.into_iter().map(|e| e.message).collect::<Vec<_>>();
        assert_eq!(
            msgs(store.events(&f(None, false, None, 3)).unwrap()),
            ["e7", "e8", "e9"]
        );
        assert_eq!(
            msgs(store.events(&f(Some("even"), false, None, 2)).unwrap()),
            ["e6", "e8"]
        );
        assert_eq!(
            msgs(store.events(&f(None, true, None, 10)).unwrap()),
            ["e9"]
        );
        assert_eq!(
            msgs(store.events(&f(None, false, Some(9), 10)).unwrap()),
            ["e9"]
        );
    }

    #[test]
    fn the_later_generation_wins_a_merge_and_deletes_travel() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a"), "node-a").unwrap();
        let b = Store::open(&dir.path().join("b"), "node-b").unwrap();
        let created = a.create_vm(&definition("vm1")).unwrap();
        assert_eq!(b.merge_vm(&created).unwrap(), Merged::Added);
        assert_eq!(b.merge_vm(&created).unwrap(), Merged::Kept);
        // a (the old primary) edits twice; b failed over once: b wins.
        a.update_vm("vm1", |r| r.desired = Desired::Running)
            .unwrap();
        let a_edit = a.update_vm("vm1", |r| r.definition.vcpus = 2).unwrap();
        let b_failover = b
            .update_vm("vm1", |r| {
                r.primary_node = Some("node-b".into());
                r.generation += 1;
            })
            .unwrap();
        assert!(a_edit.revision > b_failover.revision);
        assert_eq!(a.merge_vm(&b_failover).unwrap(), Merged::Replaced);
        assert_eq!(b.merge_vm(&a_edit).unwrap(), Merged::Kept);
        assert_eq!(a.vm("vm1").unwrap(), b.vm("vm1").unwrap());
        // A delete on b reaches a; a stale copy does not bring it back.
        let stale = a.vm("vm1").unwrap();
        b.delete_vm("vm1").unwrap();
        let tomb = b.tombstones().unwrap().pop().unwrap();
        assert_eq!(a.merge_tombstone(&tomb).unwrap(), Merged::Deleted);
        assert!(matches!(a.vm("vm1"), Err(StoreError::NoSuchVm(_))));
        assert_eq!(b.merge_vm(&stale).unwrap(), Merged::Kept);
        assert!(b.vms().unwrap().is_empty());
        // A new VM of the same name outranks the old delete.
        let again = a.create_vm(&definition("vm1")).unwrap();
        assert!(again.precedence() > tomb.precedence());
        assert_eq!(b.merge_vm(&again).unwrap(), Merged::Added);
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", 99).unwrap();
        }
        assert!(matches!(
            Store::open(&path, "node-a"),
            Err(StoreError::TooNew { found: 99, .. })
        ));
    }
}
