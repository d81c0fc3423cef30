//! The witness's records in SQLite (`<state dir>/witness.sqlite`): per VM
//! the generation and its owner. WAL with `synchronous=FULL`: a record is
//! on stable storage before the answer that depends on it leaves, so a
//! witness that loses power never grants a generation twice.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the witness database {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error(
        "the witness database {path} has schema {found}, newer than this ftwitness knows ({known})"
    )]
    TooNew {
        path: PathBuf,
        found: i64,
        known: i64,
    },
    #[error("witness database {op} failed: {source}")]
    Query {
        op: &'static str,
        source: rusqlite::Error,
    },
}

fn query(op: &'static str) -> impl FnOnce(rusqlite::Error) -> StoreError {
    move |source| StoreError::Query { op, source }
}

/// The schema version this code writes.
const SCHEMA: i64 = 1;

/// One VM's owner and generation, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ownership {
    pub generation: u64,
    pub owner: String,
    pub updated_unix_ms: u64,
}

pub struct Store {
    conn: Connection,
}

pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Store {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let open_err = |source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(open_err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        let found: i64 = conn
            .pragma_query_value(None, "user_version", |row| row.get(0))
            .map_err(open_err)?;
        if found > SCHEMA {
            return Err(StoreError::TooNew {
                path: path.to_path_buf(),
                found,
                known: SCHEMA,
            });
        }
        if found < 1 {
            conn.execute_batch(
                "CREATE TABLE IF NOT EXISTS ownership (
                    vm TEXT PRIMARY KEY,
                    generation INTEGER NOT NULL,
                    owner TEXT NOT NULL,
                    updated_unix_ms INTEGER NOT NULL
                );
                PRAGMA user_version = 1;",
            )
            .map_err(open_err)?;
        }
        Ok(Store { conn })
    }

    pub fn get(&self, vm: &str) -> Result<Option<Ownership>, StoreError> {
        self.conn
            .query_row(
                "SELECT generation, owner, updated_unix_ms FROM ownership WHERE vm = ?1",
                params![vm],
                |row| {
                    Ok(Ownership {
                        generation: row.get::<_, i64>(0)? as u64,
                        owner: row.get(1)?,
                        updated_unix_ms: row.get::<_, i64>(2)? as u64,
                    })
                },
            )
            .optional()
            .map_err(query("read"))
    }

    /// Records `owner` at `generation` for `vm` (durably, before returning).
    pub fn set(&self, vm: &str, generation: u64, owner: &str) -> Result<Ownership, StoreError> {
        let updated_unix_ms = unix_ms();
        self.conn
            .execute(
                "INSERT INTO ownership (vm, generation, owner, updated_unix_ms)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(vm) DO UPDATE SET generation = ?2, owner = ?3, updated_unix_ms = ?4",
                params![vm, generation as i64, owner, updated_unix_ms as i64],
            )
            .map_err(query("write"))?;
        Ok(Ownership {
            generation,
            owner: owner.to_string(),
            updated_unix_ms,
        })
    }

    /// Every record, by VM name.
    pub fn all(&self) -> Result<Vec<(String, Ownership)>, StoreError> {
        let mut statement = self
            .conn
            .prepare("SELECT vm, generation, owner, updated_unix_ms FROM ownership ORDER BY vm")
            .map_err(query("list"))?;
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    Ownership {
                        generation: row.get::<_, i64>(1)? as u64,
                        owner: row.get(2)?,
                        updated_unix_ms: row.get::<_, i64>(3)? as u64,
                    },
                ))
            })
            .map_err(query("list"))?;
        rows.collect::<Result<_, _>>().map_err(query("list"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_survive_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.sqlite");
        {
            let store = Store::open(&path).unwrap();
            assert_eq!(store.get("db").unwrap(), None);
            store.set("db", 1, "a").unwrap();
            store.set("db", 2, "b").unwrap();
            store.set("web", 7, "a").unwrap();
        }
        let store = Store::open(&path).unwrap();
        let db = store.get("db").unwrap().unwrap();
        assert_eq!((db.generation, db.owner.as_str()), (2, "b"));
        let all = store.all().unwrap();
        assert_eq!(all.len(), 2);
        assert_eq!(all[1].0, "web");
    }

    #[test]
    fn a_newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("witness.sqlite");
        Connection::open(&path)
            .unwrap()
            .pragma_update(None, "user_version", 9)
            .unwrap();
        assert!(matches!(
            Store::open(&path),
            Err(StoreError::TooNew { found: 9, .. })
        ));
    }
}
