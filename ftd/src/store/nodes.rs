//! The nodes' records: when each daemon was last heard, and each node's
//! maintenance state (which travels over the pair channel, so that either
//! node's API shows and changes it).

use rusqlite::{params, OptionalExtension};

use super::{query, unix_ms, Merged, Store, StoreError};
use crate::model::Maintenance;

/// A node's maintenance as the store keeps it and the pair channel
/// carries it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub maintenance: Maintenance,
    /// Who asked for the last change (the API's audit name).
    pub maintenance_by: Option<String>,
    /// When the current maintenance state began.
    pub maintenance_since_unix_ms: Option<u64>,
    /// Bumped at every change.
    pub revision: u64,
    pub updated_unix_ms: u64,
}

impl NodeRecord {
    /// A node never changed: in service.
    pub fn new(name: &str) -> NodeRecord {
        NodeRecord {
            name: name.to_string(),
            maintenance: Maintenance::Off,
            maintenance_by: None,
            maintenance_since_unix_ms: None,
            revision: 0,
            updated_unix_ms: 0,
        }
    }

    /// Which of two versions wins: the later revision, then the later
    /// change, then (two nodes that wrote in the same ms) the state's
    /// name, so that both nodes pick the same one.
    pub fn precedence(&self) -> (u64, u64, &'static str) {
        (
            self.revision,
            self.updated_unix_ms,
            self.maintenance.as_str(),
        )
    }
}

const SELECT: &str = "SELECT name, maintenance, maintenance_by, maintenance_since_unix_ms,
                             revision, updated_unix_ms FROM nodes";

fn row_to_node(row: &rusqlite::Row<'_>) -> rusqlite::Result<NodeRecord> {
    let maintenance: String = row.get(1)?;
    Ok(NodeRecord {
        name: row.get(0)?,
        // The CHECK constraint admits only the four states.
        maintenance: Maintenance::parse(&maintenance).unwrap_or_default(),
        maintenance_by: row.get(2)?,
        maintenance_since_unix_ms: row.get::<_, Option<i64>>(3)?.map(|v| v as u64),
        revision: row.get::<_, i64>(4)? as u64,
        updated_unix_ms: row.get::<_, i64>(5)? as u64,
    })
}

fn put_node(tx: &rusqlite::Transaction<'_>, node: &NodeRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO nodes (name, maintenance, maintenance_by, maintenance_since_unix_ms,
                            revision, updated_unix_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (name) DO UPDATE SET maintenance = excluded.maintenance,
             maintenance_by = excluded.maintenance_by,
             maintenance_since_unix_ms = excluded.maintenance_since_unix_ms,
             revision = excluded.revision, updated_unix_ms = excluded.updated_unix_ms",
        params![
            node.name,
            node.maintenance.as_str(),
            node.maintenance_by,
            node.maintenance_since_unix_ms.map(|v| v as i64),
            node.revision as i64,
            node.updated_unix_ms as i64
        ],
    )
    .map_err(query("write node"))?;
    Ok(())
}

impl Store {
    /// The record of `name` (in service when never changed).
    pub fn node_record(&self, name: &str) -> Result<NodeRecord, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("{SELECT} WHERE name = ?1"),
                params![name],
                row_to_node,
            )
            .optional()
            .map_err(query("read node"))?
            .unwrap_or_else(|| NodeRecord::new(name)))
    }

    /// Every node's record that was ever changed.
    pub fn node_records(&self) -> Result<Vec<NodeRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("{SELECT} WHERE revision > 0 ORDER BY name"))
            .map_err(query("list nodes"))?;
        let rows = stmt
            .query_map([], row_to_node)
            .map_err(query("list nodes"))?;
        rows.collect::<Result<_, _>>().map_err(query("list nodes"))
    }

    /// Changes the record of `name` with `change` in one transaction;
    /// bumps its revision.
    pub fn update_node(
        &self,
        name: &str,
        change: impl FnOnce(&mut NodeRecord),
    ) -> Result<NodeRecord, StoreError> {
        self.update_node_if(name, |_| true, change)
            .map(|n| n.expect("an unconditional update is made"))
    }

    /// Like [`Store::update_node`], only if `when` holds for the record as
    /// it is in the same transaction (none: it did not, nothing changed).
    pub fn update_node_if(
        &self,
        name: &str,
        when: impl FnOnce(&NodeRecord) -> bool,
        change: impl FnOnce(&mut NodeRecord),
    ) -> Result<Option<NodeRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin node update"))?;
        let mut node = tx
            .query_row(
                &format!("{SELECT} WHERE name = ?1"),
                params![name],
                row_to_node,
            )
            .optional()
            .map_err(query("read node"))?
            .unwrap_or_else(|| NodeRecord::new(name));
        if !when(&node) {
            return Ok(None);
        }
        change(&mut node);
        node.revision += 1;
        node.updated_unix_ms = unix_ms().max(node.updated_unix_ms + 1);
        put_node(&tx, &node)?;
        tx.commit().map_err(query("commit node update"))?;
        Ok(Some(node))
    }

    /// Takes the peer's version of a node's record if it outranks this
    /// node's.
    pub fn merge_node(&self, remote: &NodeRecord) -> Result<Merged, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin node merge"))?;
        let local = tx
            .query_row(
                &format!("{SELECT} WHERE name = ?1"),
                params![remote.name],
                row_to_node,
            )
            .optional()
            .map_err(query("read node"))?;
        let outcome = match &local {
            Some(l) if l.precedence() >= remote.precedence() => Merged::Kept,
            None if remote.revision == 0 => Merged::Kept,
            Some(_) => Merged::Replaced,
            None => Merged::Added,
        };
        if outcome != Merged::Kept {
            put_node(&tx, remote)?;
        }
        tx.commit().map_err(query("commit node merge"))?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_record_survives_reopening_and_the_newer_version_wins() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, "node-a").unwrap();
        // Heard before any change: in service, not listed.
        store.node_seen("node-b").unwrap();
        assert_eq!(
            store.node_record("node-b").unwrap().maintenance,
            Maintenance::Off
        );
        assert!(store.node_records().unwrap().is_empty());
        let entering = store
            .update_node("node-b", |n| {
                n.maintenance = Maintenance::Entering;
                n.maintenance_by = Some("admin@10.0.0.1".into());
            })
            .unwrap();
        assert_eq!(entering.revision, 1);
        // The last-seen time does not touch the maintenance state.
        store.node_seen("node-b").unwrap();
        drop(store);
        let store = Store::open(&path, "node-a").unwrap();
        assert_eq!(store.node_records().unwrap(), vec![entering.clone()]);
        // An older version is kept out; a newer one replaces it.
        let mut older = entering.clone();
        older.revision = 0;
        older.maintenance = Maintenance::Off;
        assert_eq!(store.merge_node(&older).unwrap(), Merged::Kept);
        let mut newer = entering.clone();
        newer.revision = 2;
        newer.maintenance = Maintenance::On;
        assert_eq!(store.merge_node(&newer).unwrap(), Merged::Replaced);
        assert_eq!(store.node_record("node-b").unwrap(), newer);
        // A node this store never heard of is added.
        let mut other = NodeRecord::new("node-c");
        other.revision = 1;
        other.maintenance = Maintenance::Leaving;
        assert_eq!(store.merge_node(&other).unwrap(), Merged::Added);
        assert_eq!(store.node_record("node-c").unwrap(), other);
        // A conditional update changes nothing when its condition fails.
        let before = store.node_record("node-b").unwrap();
        assert_eq!(
            store
                .update_node_if(
                    "node-b",
                    |n| n.maintenance == Maintenance::Off,
                    |n| { n.maintenance = Maintenance::Leaving }
                )
                .unwrap(),
            None
        );
        assert_eq!(store.node_record("node-b").unwrap(), before);
        // Two nodes that wrote the same revision in the same ms keep the
        // same version: the state's name decides.
        let mut tie = before.clone();
        tie.maintenance = Maintenance::Off;
        let (winner, loser) = if tie.precedence() > before.precedence() {
            (tie.clone(), before.clone())
        } else {
            (before.clone(), tie.clone())
        };
        assert_ne!(winner.precedence(), loser.precedence());
        let other = Store::open(&dir.path().join("db-b"), "node-b").unwrap();
        other.merge_node(&loser).unwrap();
        other.merge_node(&winner).unwrap();
        assert_eq!(other.node_record("node-b").unwrap(), winner);
        // An update bumps past the merged version.
        let off = store
            .update_node("node-b", |n| n.maintenance = Maintenance::Off)
            .unwrap();
        assert!(off.precedence() > newer.precedence());
    }
}
