//! The web console's users: a name and an argon2id hash of the password
//! (a PHC string; the password itself is never stored). The records travel
//! over the pair channel like the VMs' (the newer revision wins), so a
//! user made on either node logs in on both; a deleted user keeps its row
//! without a hash, so that the delete travels too.

use rusqlite::{params, OptionalExtension};

use super::{query, unix_ms, Merged, Store, StoreError};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UserRecord {
    pub name: String,
    /// The password's argon2id hash (PHC string); none: deleted.
    pub password_hash: Option<String>,
    pub revision: u64,
    pub updated_unix_ms: u64,
}

impl UserRecord {
    /// Which of two versions wins: the later revision, then the later
    /// change, then (the same ms on both nodes) the hash, so that both
    /// nodes pick the same one.
    pub fn precedence(&self) -> (u64, u64, &str) {
        (
            self.revision,
            self.updated_unix_ms,
            self.password_hash.as_deref().unwrap_or(""),
        )
    }
}

const SELECT: &str = "SELECT name, password_hash, revision, updated_unix_ms FROM users";

fn row_to_user(row: &rusqlite::Row<'_>) -> rusqlite::Result<UserRecord> {
    Ok(UserRecord {
        name: row.get(0)?,
        password_hash: row.get(1)?,
        revision: row.get::<_, i64>(2)? as u64,
        updated_unix_ms: row.get::<_, i64>(3)? as u64,
    })
}

fn put_user(tx: &rusqlite::Transaction<'_>, user: &UserRecord) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO users (name, password_hash, revision, updated_unix_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (name) DO UPDATE SET password_hash = excluded.password_hash,
             revision = excluded.revision, updated_unix_ms = excluded.updated_unix_ms",
        params![
            user.name,
            user.password_hash,
            user.revision as i64,
            user.updated_unix_ms as i64
        ],
    )
    .map_err(query("write user"))?;
    Ok(())
}

impl Store {
    /// Every user record, deleted ones included (they travel), by name.
    pub fn user_records(&self) -> Result<Vec<UserRecord>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare(&format!("{SELECT} ORDER BY name"))
            .map_err(query("list users"))?;
        let rows = stmt
            .query_map([], row_to_user)
            .map_err(query("list users"))?;
        rows.collect::<Result<_, _>>().map_err(query("list users"))
    }

    /// The live user `name` (none: never made, or deleted).
    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StoreError> {
        Ok(self
            .conn()
            .query_row(
                &format!("{SELECT} WHERE name = ?1"),
                params![name],
                row_to_user,
            )
            .optional()
            .map_err(query("read user"))?
            .filter(|u| u.password_hash.is_some()))
    }

    /// Sets (or with `None`, deletes) the password hash of `name`; returns
    /// the record, or none when deleting a user that does not exist.
    pub fn set_user(
        &self,
        name: &str,
        password_hash: Option<String>,
    ) -> Result<Option<UserRecord>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin user update"))?;
        let before = tx
            .query_row(
                &format!("{SELECT} WHERE name = ?1"),
                params![name],
                row_to_user,
            )
            .optional()
            .map_err(query("read user"))?;
        let live = before.as_ref().is_some_and(|u| u.password_hash.is_some());
        if password_hash.is_none() && !live {
            return Ok(None);
        }
        let user = UserRecord {
            name: name.to_string(),
            password_hash,
            revision: before.as_ref().map_or(0, |u| u.revision) + 1,
            updated_unix_ms: unix_ms().max(before.map_or(0, |u| u.updated_unix_ms + 1)),
        };
        put_user(&tx, &user)?;
        tx.commit().map_err(query("commit user update"))?;
        Ok(Some(user))
    }

    /// Takes the peer's version of a user if it outranks this node's.
    pub fn merge_user(&self, remote: &UserRecord) -> Result<Merged, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(query("begin user merge"))?;
        let local = tx
            .query_row(
                &format!("{SELECT} WHERE name = ?1"),
                params![remote.name],
                row_to_user,
            )
            .optional()
            .map_err(query("read user"))?;
        let outcome = match &local {
            Some(l) if l.precedence() >= remote.precedence() => Merged::Kept,
            Some(_) if remote.password_hash.is_none() => Merged::Deleted,
            Some(_) => Merged::Replaced,
            None => Merged::Added,
        };
        if outcome != Merged::Kept {
            put_user(&tx, remote)?;
        }
        tx.commit().map_err(query("commit user merge"))?;
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_survive_reopening_and_deletes_travel() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db");
        let store = Store::open(&path, "node-a").unwrap();
        assert_eq!(store.set_user("alice", None).unwrap(), None);
        let alice = store
            .set_user(
                "alice",
                Some("$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA".into()),
            )
            .unwrap()
            .unwrap();
        assert_eq!(alice.revision, 1);
        drop(store);
        let store = Store::open(&path, "node-a").unwrap();
        assert_eq!(store.user("alice").unwrap(), Some(alice.clone()));
        // A delete keeps a row without a hash, newer than the user.
        let gone = store.set_user("alice", None).unwrap().unwrap();
        assert!(gone.precedence() > alice.precedence());
        assert_eq!(store.user("alice").unwrap(), None);
        assert_eq!(store.user_records().unwrap(), vec![gone.clone()]);
        // On another node: the older version is replaced by the delete,
        // and an older one does not bring the user back.
        let other = Store::open(&dir.path().join("db-b"), "node-b").unwrap();
        assert_eq!(other.merge_user(&alice).unwrap(), Merged::Added);
        assert_eq!(other.merge_user(&gone).unwrap(), Merged::Deleted);
        assert_eq!(other.merge_user(&alice).unwrap(), Merged::Kept);
        assert_eq!(other.user("alice").unwrap(), None);
    }
}
