//! The ledger: a TCP service whose every acknowledged operation must
//! survive every failover, and the client that drives and checks it.
//!
//! Protocol (one request per line, one answer per line):
//! ```text
//! APPEND <id>  ->  OK <id> <seq>      (after the id is in memory and fsync'd to the file)
//! DUMP         ->  MEM <n> <id> ...   (the ids in memory, in order)
//! FILE         ->  FILE <n> <id> ...  (the ids read back from the file on disk)
//! PING         ->  PONG
//! SPIN <ms>    ->  SPUN <loop turns>          (CPU-bound work timed in the guest)
//! DIRTY <ms> <mib> -> DIRTIED <pages>         (memory-bound work timed in the guest)
//! anything else -> ERR <reason>
//! ```

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("cannot connect to the ledger at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("ledger connection failed during {what}: {source}")]
    Io {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the ledger closed the connection during {what}")]
    Closed { what: &'static str },
    #[error("unexpected answer to {what}: {line:?}")]
    Answer { what: &'static str, line: String },
}

/// Parses "TAG n id id ..." into the ids.
pub fn parse_ids(tag: &str, line: &str) -> Option<Vec<u64>> {
    let mut words = line.split_ascii_whitespace();
    if words.next()? != tag {
        return None;
    }
    let n: usize = words.next()?.parse().ok()?;
    let ids: Vec<u64> = words.map(|w| w.parse().ok()).collect::<Option<_>>()?;
    (ids.len() == n).then_some(ids)
}

/// One client connection to the ledger.
pub struct LedgerClient {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    line: String,
}

impl LedgerClient {
    /// Connects; every answer must come within `timeout`.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> Result<LedgerClient, LedgerError> {
        let stream = TcpStream::connect_timeout(&addr, timeout)
            .map_err(|source| LedgerError::Connect { addr, source })?;
        let io = |source| LedgerError::Io {
            what: "connect",
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        let reader = BufReader::new(stream.try_clone().map_err(io)?);
        Ok(LedgerClient {
            stream,
            reader,
            line: String::new(),
        })
    }

    fn request(&mut self, what: &'static str, request: &str) -> Result<&str, LedgerError> {
        let io = |source| LedgerError::Io { what, source };
        self.stream
            .write_all(format!("{request}\n").as_bytes())
            .map_err(io)?;
        self.line.clear();
        if self.reader.read_line(&mut self.line).map_err(io)? == 0 {
            return Err(LedgerError::Closed { what });
        }
        Ok(self.line.trim_end())
    }

    /// Appends `id`; Ok(seq) once the ledger acknowledged it.
    /// This end's address (to match a connection in the guest's log).
    pub fn local_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.local_addr().ok()
    }

    /// The ledger's address.
    pub fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.stream.peer_addr().ok()
    }

    pub fn append(&mut self, id: u64) -> Result<u64, LedgerError> {
        let line = self.request("APPEND", &format!("APPEND {id}"))?;
        let mut w = line.split_ascii_whitespace();
        match (
            w.next(),
            w.next().and_then(|v| v.parse::<u64>().ok()),
            w.next().and_then(|v| v.parse::<u64>().ok()),
        ) {
            (Some("OK"), Some(got), Some(seq)) if got == id => Ok(seq),
            _ => Err(LedgerError::Answer {
                what: "APPEND",
                line: line.to_string(),
            }),
        }
    }

    /// One round trip; returns how long it took.
    pub fn ping(&mut self) -> Result<Duration, LedgerError> {
        let start = Instant::now();
        let line = self.request("PING", "PING")?;
        if line != "PONG" {
            return Err(LedgerError::Answer {
                what: "PING",
                line: line.to_string(),
            });
        }
        Ok(start.elapsed())
    }

    /// Runs a workload in the guest (`SPIN ms` or `DIRTY ms mib`); returns
    /// the work count it reports.
    pub fn workload(&mut self, request: &str) -> Result<u64, LedgerError> {
        let line = self.request("workload", request)?;
        line.split_ascii_whitespace()
            .nth(1)
            .and_then(|n| n.parse().ok())
            .ok_or(LedgerError::Answer {
                what: "workload",
                line: line.to_string(),
            })
    }

    /// Runs a workload in the guest that reports several figures (`DISKLAT
    /// n`: p50 and p99 of n fsync'd 4 KiB writes in µs, and n; `DISKSEQ
    /// mib`: bytes written sequentially and the µs it took, fsync
    /// included); returns them.
    pub fn workload_figures(&mut self, request: &str) -> Result<Vec<u64>, LedgerError> {
        let line = self.request("workload", request)?.to_string();
        let figures: Option<Vec<u64>> = line
            .split_ascii_whitespace()
            .skip(1)
            .map(|n| n.parse().ok())
            .collect();
        match figures {
            Some(f) if !f.is_empty() && !line.starts_with("ERR") => Ok(f),
            _ => Err(LedgerError::Answer {
                what: "workload",
                line,
            }),
        }
    }

    /// The ids the service holds in memory.
    pub fn dump(&mut self) -> Result<Vec<u64>, LedgerError> {
        let line = self.request("DUMP", "DUMP")?.to_string();
        parse_ids("MEM", &line).ok_or(LedgerError::Answer { what: "DUMP", line })
    }

    /// The ids read back from the ledger file on the guest's disk.
    pub fn file(&mut self) -> Result<Vec<u64>, LedgerError> {
        let line = self.request("FILE", "FILE")?.to_string();
        parse_ids("FILE", &line).ok_or(LedgerError::Answer { what: "FILE", line })
    }
}

/// What checking a ledger against the acknowledged operations found.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Verdict {
    /// Acknowledged ids missing from the ledger.
    pub lost: Vec<u64>,
    /// Ids present more than once.
    pub duplicated: Vec<u64>,
    /// Ids in the ledger that were never sent.
    pub unknown: Vec<u64>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.lost.is_empty() && self.duplicated.is_empty() && self.unknown.is_empty()
    }
}

/// Checks `ledger` against the `acked` ids, with `sent_max` the highest id
/// ever sent (an id sent but not yet acknowledged may or may not be there).
pub fn verify(acked: &[u64], sent_max: u64, ledger: &[u64]) -> Verdict {
    let mut seen: HashMap<u64, u32> = HashMap::new();
    for id in ledger {
        *seen.entry(*id).or_default() += 1;
    }
    let mut v = Verdict {
        lost: acked
            .iter()
            .copied()
            .filter(|id| !seen.contains_key(id))
            .collect(),
        ..Verdict::default()
    };
    let mut ids: Vec<_> = seen.into_iter().collect();
    ids.sort_unstable();
    for (id, count) in ids {
        if count > 1 {
            v.duplicated.push(id);
        }
        if id == 0 || id > sent_max {
            v.unknown.push(id);
        }
    }
    v
}

/// Timestamps of acknowledgements, to measure outages.
#[derive(Debug, Default)]
pub struct AckTimes {
    pub times: Vec<(u64, Instant)>,
}

impl AckTimes {
    /// The first acknowledgement at or after `t`.
    pub fn first_after(&self, t: Instant) -> Option<(u64, Instant)> {
        self.times.iter().copied().find(|&(_, at)| at >= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_find_lost_duplicated_and_unknown_ids() {
        assert!(verify(&[1, 2, 3], 4, &[1, 2, 3, 4]).ok());
        let v = verify(&[1, 2, 3], 3, &[1, 3, 3, 9]);
        assert_eq!(v.lost, vec![2]);
        assert_eq!(v.duplicated, vec![3]);
        assert_eq!(v.unknown, vec![9]);
        assert!(!v.ok());
    }

    #[test]
    fn id_lists_parse_only_when_complete() {
        assert_eq!(parse_ids("MEM", "MEM 3 1 2 3"), Some(vec![1, 2, 3]));
        assert_eq!(parse_ids("MEM", "MEM 0"), Some(vec![]));
        assert_eq!(parse_ids("MEM", "MEM 3 1 2"), None);
        assert_eq!(parse_ids("MEM", "FILE 1 1"), None);
        assert_eq!(parse_ids("MEM", "MEM 1 x"), None);
    }
}
