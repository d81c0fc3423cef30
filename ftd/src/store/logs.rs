//! The event log and the audit log. Each node keeps both nodes' entries:
//! its own, and its peer's, which come over the pair channel
//! ([`Store::take_peer_entries`]) with the identity of the log that made
//! them (that node's [`Store::log_id`], made with its database) and their
//! number there. So an entry is stored once however often it comes, and a
//! rebuilt peer's new log is told apart from the one it replaced. Every
//! entry also has a number here, in the order this node learned of it: the
//! API's paging and the live stream's catch-up go by that one.

use rusqlite::{params, OptionalExtension};

use super::{query, unix_ms, EventFilter, Store, StoreError};
use crate::model::{AuditEntry, Event, Severity};

/// How far a node holds another node's logs: that log's identity and the
/// newest entry of each kind held (by its number there), with a
/// fingerprint of each of those two entries as the holder has them.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LogMark {
    pub log: String,
    pub events: u64,
    pub audit: u64,
    /// [`Fingerprint`] of the event numbered `events` as the holder has
    /// it: none with nothing held, and from a daemon before them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_fingerprint: Option<u32>,
    /// The same of the audit entry numbered `audit`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audit_fingerprint: Option<u32>,
}

impl LogMark {
    /// A mark without fingerprints.
    pub fn new(log: &str, events: u64, audit: u64) -> LogMark {
        LogMark {
            log: log.to_string(),
            events,
            audit,
            events_fingerprint: None,
            audit_fingerprint: None,
        }
    }
}

/// A checksum (crc32) of what makes a log entry the one it is, the same on
/// both nodes for one entry (each column as stored: the peer stores what
/// the owner sent of its row) and across builds: the log's owner compares
/// a mark's with its own entry of that number to notice that its database
/// went back to an older copy and numbered new entries again where the
/// peer holds older ones ([`Store::own_entries_differ`]).
struct Fingerprint;

impl Fingerprint {
    /// The columns a fingerprint covers, by table.
    fn columns(table: &str) -> &'static str {
        if table == "events" {
            "unix_ms, node, kind, message"
        } else {
            "unix_ms, node, who, action, status, result"
        }
    }

    /// How many columns [`Fingerprint::columns`] names for `table`.
    fn count(table: &str) -> usize {
        Fingerprint::columns(table).split(',').count()
    }

    /// The fingerprint of an entry of `table` that `row` holds in its
    /// first columns ([`Fingerprint::columns`]; any after them are not
    /// covered).
    fn of(table: &str, row: &rusqlite::Row<'_>) -> rusqlite::Result<u32> {
        let mut crc = crc32fast::Hasher::new();
        for i in 0..Fingerprint::count(table) {
            match row.get_ref(i)? {
                rusqlite::types::ValueRef::Integer(n) => {
                    crc.update(b"i");
                    crc.update(&n.to_le_bytes());
                }
                rusqlite::types::ValueRef::Text(t) | rusqlite::types::ValueRef::Blob(t) => {
                    crc.update(b"t");
                    crc.update(&(t.len() as u64).to_le_bytes());
                    crc.update(t);
                }
                rusqlite::types::ValueRef::Real(r) => {
                    crc.update(b"r");
                    crc.update(&r.to_le_bytes());
                }
                rusqlite::types::ValueRef::Null => crc.update(b"n"),
            }
        }
        Ok(crc.finalize())
    }
}

/// The columns [`row_to_event`] reads, in its order.
const EVENT_COLUMNS: &str = "id, unix_ms, node, severity, alert, kind, vm, message";
/// The columns [`row_to_audit`] reads, in its order.
const AUDIT_COLUMNS: &str = "id, unix_ms, node, who, action, status, result";

fn row_to_event(row: &rusqlite::Row<'_>) -> rusqlite::Result<Event> {
    let severity: String = row.get(3)?;
    Ok(Event {
        id: row.get::<_, i64>(0)? as u64,
        unix_ms: row.get::<_, i64>(1)? as u64,
        node: row.get(2)?,
        severity: Severity::parse(&severity).unwrap_or(Severity::Warning),
        alert: row.get(4)?,
        kind: row.get(5)?,
        vm: row.get(6)?,
        message: row.get(7)?,
    })
}

fn row_to_audit(row: &rusqlite::Row<'_>) -> rusqlite::Result<AuditEntry> {
    Ok(AuditEntry {
        id: row.get::<_, i64>(0)? as u64,
        unix_ms: row.get::<_, i64>(1)? as u64,
        node: row.get(2)?,
        who: row.get(3)?,
        action: row.get(4)?,
        status: row.get(5)?,
        result: row.get(6)?,
    })
}

impl Store {
    /// The identity of this node's own logs (made with its database).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// Appends an event; returns it with its id.
    pub fn add_event(
        &self,
        severity: Severity,
        alert: bool,
        kind: &str,
        vm: Option<&str>,
        message: &str,
    ) -> Result<Event, StoreError> {
        let now = unix_ms();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO events (unix_ms, node, severity, alert, kind, vm, message)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                now as i64,
                self.node,
                severity.as_str(),
                alert,
                kind,
                vm,
                message
            ],
        )
        .map_err(query("add event"))?;
        Ok(Event {
            id: conn.last_insert_rowid() as u64,
            unix_ms: now,
            node: self.node.clone(),
            severity,
            alert,
            kind: kind.to_string(),
            vm: vm.map(str::to_string),
            message: message.to_string(),
        })
    }

    /// Events matching `filter`, newest last.
    pub fn events(&self, filter: &EventFilter) -> Result<Vec<Event>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {EVENT_COLUMNS} FROM (
                     SELECT * FROM events
                     WHERE (?1 IS NULL OR vm = ?1) AND (?2 = 0 OR alert = 1) AND id > ?3
                     ORDER BY id DESC LIMIT ?4)
                 ORDER BY id"
            ))
            .map_err(query("list events"))?;
        let rows = stmt
            .query_map(
                params![
                    filter.vm,
                    filter.alerts_only,
                    filter.after.unwrap_or(0) as i64,
                    filter.limit as i64
                ],
                row_to_event,
            )
            .map_err(query("list events"))?;
        rows.collect::<Result<_, _>>().map_err(query("list events"))
    }

    /// Appends an entry to the audit log.
    pub fn add_audit(
        &self,
        who: &str,
        action: &str,
        status: u16,
        result: &str,
    ) -> Result<AuditEntry, StoreError> {
        let now = unix_ms();
        let conn = self.conn();
        conn.execute(
            "INSERT INTO audit (unix_ms, node, who, action, status, result)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![now as i64, self.node, who, action, status, result],
        )
        .map_err(query("add audit entry"))?;
        Ok(AuditEntry {
            id: conn.last_insert_rowid() as u64,
            unix_ms: now,
            node: self.node.clone(),
            who: who.to_string(),
            action: action.to_string(),
            status,
            result: result.to_string(),
        })
    }

    /// The last `limit` audit entries, oldest first.
    pub fn audit(&self, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {AUDIT_COLUMNS} FROM (
                     SELECT * FROM audit ORDER BY id DESC LIMIT ?1) ORDER BY id"
            ))
            .map_err(query("list audit"))?;
        let rows = stmt
            .query_map(params![limit as i64], row_to_audit)
            .map_err(query("list audit"))?;
        rows.collect::<Result<_, _>>().map_err(query("list audit"))
    }

    /// This node's own events after its number `after`, oldest first, at
    /// most `limit`; none logged before the logs were shared (migration
    /// 5), which stay its own.
    pub fn own_events_after(&self, after: u64, limit: usize) -> Result<Vec<Event>, StoreError> {
        let after = after.max(self.shared_after.0);
        self.own_after("events", EVENT_COLUMNS, row_to_event, (after, limit))
    }

    /// This node's own audit entries after its number `after`, oldest
    /// first, at most `limit`; none logged before the logs were shared.
    pub fn own_audit_after(&self, after: u64, limit: usize) -> Result<Vec<AuditEntry>, StoreError> {
        let after = after.max(self.shared_after.1);
        self.own_after("audit", AUDIT_COLUMNS, row_to_audit, (after, limit))
    }

    /// The rows of `table` this node logged itself, after number `after`.
    fn own_after<T>(
        &self,
        table: &str,
        columns: &str,
        row_to: fn(&rusqlite::Row<'_>) -> rusqlite::Result<T>,
        (after, limit): (u64, usize),
    ) -> Result<Vec<T>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!(
                "SELECT {columns} FROM {table}
                 WHERE origin_log IS NULL AND id > ?1 ORDER BY id LIMIT ?2"
            ))
            .map_err(query("list this node's own log entries"))?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64], row_to)
            .map_err(query("list this node's own log entries"))?;
        rows.collect::<Result<_, _>>()
            .map_err(query("list this node's own log entries"))
    }

    /// How far this node holds the logs whose identity is `log` (its
    /// peer's), with the fingerprints of the newest entries held.
    pub fn held_of(&self, log: &str) -> Result<LogMark, StoreError> {
        let conn = self.conn();
        let newest = |table: &str| -> Result<(u64, Option<u32>), StoreError> {
            let newest = conn
                .query_row(
                    &format!(
                        "SELECT {}, origin_id FROM {table} WHERE origin_log = ?1
                         ORDER BY origin_id DESC LIMIT 1",
                        Fingerprint::columns(table)
                    ),
                    params![log],
                    |row| {
                        let number = row.get::<_, i64>(Fingerprint::count(table))?;
                        Ok((number as u64, Fingerprint::of(table, row)?))
                    },
                )
                .optional()
                .map_err(query("read the peer's log mark"))?;
            Ok(newest.map_or((0, None), |(number, print)| (number, Some(print))))
        };
        let (events, events_fingerprint) = newest("events")?;
        let (audit, audit_fingerprint) = newest("audit")?;
        Ok(LogMark {
            log: log.to_string(),
            events,
            audit,
            events_fingerprint,
            audit_fingerprint,
        })
    }

    /// Whether this node's own entry of a number `mark` (how far its peer
    /// holds this node's logs) fingerprints is not the one the peer holds
    /// under that number: this node's database went back to an older copy
    /// and numbered new entries again where the peer holds others, which
    /// then never reach it. [`Store::number_own_entries_past`] notices
    /// the same while this node's numbering is still behind the mark;
    /// this, once it has passed it. An entry this node no longer has, or a
    /// mark without fingerprints (a daemon before them), says nothing.
    pub fn own_entries_differ(&self, mark: &LogMark) -> Result<bool, StoreError> {
        if mark.log != self.log_id {
            return Ok(false);
        }
        let conn = self.conn();
        for (table, number, theirs) in [
            ("events", mark.events, mark.events_fingerprint),
            ("audit", mark.audit, mark.audit_fingerprint),
        ] {
            let Some(theirs) = theirs else { continue };
            let Ok(number) = i64::try_from(number) else {
                continue;
            };
            let ours = conn
                .query_row(
                    &format!(
                        "SELECT {} FROM {table} WHERE origin_log IS NULL AND id = ?1",
                        Fingerprint::columns(table)
                    ),
                    params![number],
                    |row| Fingerprint::of(table, row),
                )
                .optional()
                .map_err(query("read this node's entry at the peer's mark"))?;
            if ours.is_some_and(|ours| ours != theirs) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Numbers this node's next own entries past `mark` (how far its peer
    /// holds this node's logs, by this node's numbers) when this node's
    /// numbering is behind it: its database went back to an older copy
    /// (restored from a backup or a snapshot), and entries numbered again
    /// at or below the mark would never reach the peer. Returns whether it
    /// was behind.
    pub fn number_own_entries_past(&self, mark: &LogMark) -> Result<bool, StoreError> {
        // A mark no log reaches (a faulty peer) would leave no numbers.
        const MARK_MAX: u64 = 1 << 48;
        if mark.log != self.log_id || mark.events.max(mark.audit) > MARK_MAX {
            return Ok(false);
        }
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(query("begin renumbering this node's entries"))?;
        let mut behind = false;
        for (table, past) in [("events", mark.events), ("audit", mark.audit)] {
            // AUTOINCREMENT numbers after the largest number this table
            // ever had (`sqlite_sequence`, a row once the table had one).
            let next_after: u64 =
                tx.query_row(
                    "SELECT COALESCE((SELECT seq FROM sqlite_sequence WHERE name = ?1), 0)",
                    params![table],
                    |row| row.get::<_, i64>(0),
                )
                .map_err(query("read this node's numbering"))? as u64;
            if next_after >= past {
                continue;
            }
            behind = true;
            tx.execute(
                "DELETE FROM sqlite_sequence WHERE name = ?1",
                params![table],
            )
            .map_err(query("renumber this node's entries"))?;
            tx.execute(
                "INSERT INTO sqlite_sequence (name, seq) VALUES (?1, ?2)",
                params![table, past as i64],
            )
            .map_err(query("renumber this node's entries"))?;
        }
        tx.commit()
            .map_err(query("commit renumbering this node's entries"))?;
        Ok(behind)
    }

    /// Stores the entries of the logs `log` (the peer's) that this node
    /// does not hold yet, each with its number there (`id`); returns the
    /// events stored, with their numbers here, for the live stream.
    pub fn take_peer_entries(
        &self,
        log: &str,
        events: &[Event],
        audit: &[AuditEntry],
    ) -> Result<Vec<Event>, StoreError> {
        let mut conn = self.conn();
        let tx = conn
            .transaction()
            .map_err(query("begin taking the peer's entries"))?;
        let mut stored = Vec::new();
        for e in events {
            let added = tx
                .execute(
                    "INSERT INTO events (unix_ms, node, severity, alert, kind, vm, message, origin_log, origin_id)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                     ON CONFLICT (origin_log, origin_id) DO NOTHING",
                    params![
                        e.unix_ms as i64,
                        e.node,
                        e.severity.as_str(),
                        e.alert,
                        e.kind,
                        e.vm,
                        e.message,
                        log,
                        e.id as i64
                    ],
                )
                .map_err(query("add the peer's event"))?;
            if added == 1 {
                stored.push(Event {
                    id: tx.last_insert_rowid() as u64,
                    ..e.clone()
                });
            }
        }
        for a in audit {
            tx.execute(
                "INSERT INTO audit (unix_ms, node, who, action, status, result, origin_log, origin_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
                 ON CONFLICT (origin_log, origin_id) DO NOTHING",
                params![
                    a.unix_ms as i64,
                    a.node,
                    a.who,
                    a.action,
                    a.status,
                    a.result,
                    log,
                    a.id as i64
                ],
            )
            .map_err(query("add the peer's audit entry"))?;
        }
        tx.commit().map_err(query("commit the peer's entries"))?;
        Ok(stored)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &tempfile::TempDir, name: &str) -> Store {
        Store::open(&dir.path().join(name), name).unwrap()
    }

    /// Every event `store` holds, as (node, message).
    fn all_events(store: &Store) -> Vec<(String, String)> {
        let all = EventFilter {
            limit: 1000,
            ..Default::default()
        };
        store
            .events(&all)
            .unwrap()
            .into_iter()
            .map(|e| (e.node, e.message))
            .collect()
    }

    #[test]
    fn the_peers_entries_are_kept_once_and_its_own_are_told_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (open(&dir, "node-a"), open(&dir, "node-b"));
        assert_ne!(a.log_id(), b.log_id(), "each database has a log of its own");
        a.add_event(Severity::Info, false, "vm", None, "a1")
            .unwrap();
        for n in 1..=3 {
            b.add_event(
                Severity::Warning,
                n == 3,
                "vm",
                Some("vm1"),
                &format!("b{n}"),
            )
            .unwrap();
            b.add_audit("admin@b", "POST /api/vms", 201, "made")
                .unwrap();
        }
        let events = b.own_events_after(0, 100).unwrap();
        let audit = b.own_audit_after(0, 100).unwrap();
        assert_eq!(events.len(), 3);
        assert_eq!(audit.len(), 3);
        // Taken twice (a state sent again): kept once.
        let stored = a.take_peer_entries(b.log_id(), &events, &audit).unwrap();
        assert_eq!(stored.len(), 3);
        assert!(a
            .take_peer_entries(b.log_id(), &events, &audit)
            .unwrap()
            .is_empty());
        assert_eq!(
            all_events(&a),
            [
                ("node-a", "a1"),
                ("node-b", "b1"),
                ("node-b", "b2"),
                ("node-b", "b3")
            ]
            .map(|(n, m)| (n.to_string(), m.to_string()))
        );
        // The stored events have a's numbers; the alert stays an alert.
        assert_eq!(stored[0].id, 2);
        assert!(stored[2].alert && stored[2].severity == Severity::Warning);
        assert_eq!(a.audit(100).unwrap().len(), 3);
        // How far a holds b's logs, by b's numbers; a's own entries only
        // are a's to send.
        let held = a.held_of(b.log_id()).unwrap();
        assert_eq!((held.events, held.audit), (3, 3));
        assert_eq!(a.held_of(a.log_id()).unwrap().events, 0);
        assert_eq!(
            a.own_events_after(0, 100)
                .unwrap()
                .into_iter()
                .map(|e| e.message)
                .collect::<Vec<_>>(),
            ["a1"]
        );
        assert!(a.own_audit_after(0, 100).unwrap().is_empty());
        // b rebuilt (a new database, numbers from 1 again): its entries
        // are new ones, not taken for those of its old log.
        let rebuilt = Store::open(&dir.path().join("node-b-rebuilt"), "node-b").unwrap();
        rebuilt
            .add_event(Severity::Info, false, "node", None, "b again")
            .unwrap();
        let again = rebuilt.own_events_after(0, 100).unwrap();
        assert_eq!(again[0].id, 1);
        let stored = a.take_peer_entries(rebuilt.log_id(), &again, &[]).unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(all_events(&a).len(), 5);
        assert_eq!(a.held_of(rebuilt.log_id()).unwrap().events, 1);
    }

    #[test]
    fn a_database_behind_its_peers_mark_numbers_its_new_entries_past_it() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&dir, "node-a");
        for n in 0..3 {
            a.add_event(Severity::Info, false, "vm", None, &format!("e{n}"))
                .unwrap();
        }
        a.add_audit("admin@x", "POST /api/vms", 201, "made")
            .unwrap();
        // The peer held entries up to 10 and 4 of this log (numbered
        // before a's database went back to an older copy).
        let mark = LogMark::new(a.log_id(), 10, 4);
        assert!(a.number_own_entries_past(&mark).unwrap());
        assert!(!a.number_own_entries_past(&mark).unwrap(), "once");
        let next = a
            .add_event(Severity::Info, false, "vm", None, "new")
            .unwrap();
        assert_eq!(next.id, 11);
        assert_eq!(
            a.add_audit("admin@x", "DELETE /api/vms/x", 204, "")
                .unwrap()
                .id,
            5
        );
        assert_eq!(
            a.own_events_after(mark.events, 10).unwrap()[0].message,
            "new",
            "sent on from the peer's mark"
        );
        // A mark of another log, or one not ahead: nothing changes.
        let other = LogMark::new("another", 100, 100);
        assert!(!a.number_own_entries_past(&other).unwrap());
        assert!(!a.number_own_entries_past(&mark).unwrap());
        // A mark no log reaches (a faulty peer) is ignored.
        let faulty = LogMark {
            events: u64::MAX,
            ..mark.clone()
        };
        assert!(!a.number_own_entries_past(&faulty).unwrap());
        assert_eq!(
            a.add_event(Severity::Info, false, "vm", None, "n")
                .unwrap()
                .id,
            12
        );
    }

    #[test]
    fn a_database_gone_back_and_numbered_past_its_peers_mark_is_noticed_by_fingerprint() {
        let dir = tempfile::tempdir().unwrap();
        let a = open(&dir, "node-a");
        let b = open(&dir, "node-b");
        // b holds a's entries as a has them: nothing differs.
        a.add_event(Severity::Info, false, "vm", None, "first")
            .unwrap();
        a.add_audit("admin@x", "POST /api/vms", 201, "made")
            .unwrap();
        let (events, audit) = (
            a.own_events_after(0, 10).unwrap(),
            a.own_audit_after(0, 10).unwrap(),
        );
        b.take_peer_entries(a.log_id(), &events, &audit).unwrap();
        let mark = b.held_of(a.log_id()).unwrap();
        assert_eq!((mark.events, mark.audit), (1, 1));
        assert!(mark.events_fingerprint.is_some() && mark.audit_fingerprint.is_some());
        assert!(!a.own_entries_differ(&mark).unwrap());

        // c's database goes back to a copy from before its entries that
        // b holds (here: to none), and it logs more than b holds before
        // it hears from b again: its numbering is not behind b's mark,
        // but its entries of those numbers are others.
        let c = open(&dir, "node-c");
        let before = open(&dir, "node-c-before");
        for n in 0..3 {
            before
                .add_event(Severity::Info, false, "vm", None, &format!("before {n}"))
                .unwrap();
        }
        before
            .add_audit("admin@x", "POST /api/vms", 201, "made")
            .unwrap();
        let (events, audit) = (
            before.own_events_after(0, 10).unwrap(),
            before.own_audit_after(0, 10).unwrap(),
        );
        b.take_peer_entries(c.log_id(), &events, &audit).unwrap();
        let mark = b.held_of(c.log_id()).unwrap();
        assert_eq!((mark.events, mark.audit), (3, 1));
        for n in 0..4 {
            c.add_event(Severity::Info, false, "vm", None, &format!("after {n}"))
                .unwrap();
        }
        c.add_audit("admin@x", "POST /api/vms", 201, "made")
            .unwrap();
        assert!(!c.number_own_entries_past(&mark).unwrap());
        assert!(c.own_entries_differ(&mark).unwrap());
        // The audit entry alone (the same action, at another time).
        let audit_only = LogMark {
            events_fingerprint: None,
            ..mark.clone()
        };
        assert!(c.own_entries_differ(&audit_only).unwrap());
        // Without fingerprints (a daemon before them), of another log, or
        // at a number c does not have: nothing is said.
        assert!(!c
            .own_entries_differ(&LogMark::new(c.log_id(), 3, 1))
            .unwrap());
        assert!(!c
            .own_entries_differ(&LogMark {
                log: "another".into(),
                ..mark.clone()
            })
            .unwrap());
        assert!(!c
            .own_entries_differ(&LogMark {
                events: 9,
                audit: 9,
                ..mark.clone()
            })
            .unwrap());
    }

    #[test]
    fn what_a_node_logged_before_the_logs_were_shared_stays_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        {
            // A database of the version before (schema 4), with entries.
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            for (i, sql) in super::super::schema::MIGRATIONS[..4].iter().enumerate() {
                let tx = conn.transaction().unwrap();
                tx.execute_batch(sql).unwrap();
                tx.pragma_update(None, "user_version", (i + 1) as i64)
                    .unwrap();
                tx.commit().unwrap();
            }
            conn.execute(
                "INSERT INTO events (unix_ms, node, severity, alert, kind, vm, message)
                 VALUES (1, 'node-a', 'info', 0, 'vm', NULL, 'old')",
                [],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO audit (unix_ms, node, who, action, status, result)
                 VALUES (1, 'node-a', 'admin@x', 'POST /api/vms', 201, '')",
                [],
            )
            .unwrap();
        }
        let store = Store::open(&path, "node-a").unwrap();
        assert!(store.own_events_after(0, 10).unwrap().is_empty());
        assert!(store.own_audit_after(0, 10).unwrap().is_empty());
        store
            .add_event(Severity::Info, false, "vm", None, "new")
            .unwrap();
        let own = store.own_events_after(0, 10).unwrap();
        assert_eq!(
            own.iter().map(|e| e.message.as_str()).collect::<Vec<_>>(),
            ["new"]
        );
        // Both stay in its own log.
        assert_eq!(all_events(&store).len(), 2);
    }

    #[test]
    fn a_database_without_the_shared_after_keys_opens_and_shares_all() {
        let dir = tempfile::tempdir().unwrap();
        let store = open(&dir, "node-a");
        store
            .add_event(Severity::Info, false, "vm", None, "e1")
            .unwrap();
        store
            .conn()
            .execute("DELETE FROM meta WHERE key LIKE '%_shared_after'", [])
            .unwrap();
        drop(store);
        let store = open(&dir, "node-a");
        assert_eq!(store.own_events_after(0, 10).unwrap().len(), 1);
    }

    #[test]
    fn a_database_keeps_its_log_identity_across_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let first = open(&dir, "node-a").log_id().to_string();
        assert_eq!(first.len(), 32, "{first}");
        assert_eq!(open(&dir, "node-a").log_id(), first);
    }
}
