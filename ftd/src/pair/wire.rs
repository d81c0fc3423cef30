//! What the two daemons tell each other on the pair channel: each side's
//! whole state (VM records, tombstones, the roles running on it, the
//! nodes' maintenance) with the entries of its event and audit logs the
//! other lacks, sent when it changes and every second; and a VM move
//! asked through one node's API of the node that runs its primary, with
//! that node's answer. JSON in A-link message frames.

use bytes::Bytes;
use ft_link::{Frame, FrameKind};
use replicator::status::{FtState, Role};
use serde::{Deserialize, Serialize};

use crate::model::{AuditEntry, Event, VmView};
use crate::store::{LogMark, NodeRecord, Tombstone, UserRecord, VmRecord};

/// The pair channel's protocol version.
pub const PAIR_VERSION: u32 = 1;
/// The message code of a [`PairState`] frame.
pub const STATE_CODE: u8 = 64;
/// The message code of a [`MoveAsk`] frame.
pub const MOVE_ASK_CODE: u8 = 65;
/// The message code of a [`MoveAnswer`] frame.
pub const MOVE_ANSWER_CODE: u8 = 66;

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode this node's message: {0}")]
    Encode(serde_json::Error),
    #[error("cannot frame this node's message: {0}")]
    Frame(ft_link::FrameError),
    #[error("the peer sent a {0:?} frame, not a pair message")]
    UnexpectedFrame(FrameKind),
    #[error("the peer's message ({len} bytes) is not valid: {source}")]
    Decode {
        len: usize,
        source: serde_json::Error,
    },
    #[error("the peer speaks pair protocol {0}, this node {PAIR_VERSION}")]
    Version(u32),
}

/// A role running on the sending node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoleReport {
    pub vm: String,
    pub role: Role,
    pub state: FtState,
    pub epoch: Option<u64>,
    #[serde(default)]
    pub peer: Option<String>,
    pub message: Option<String>,
    /// The engine's counters (for the console's charts on either node).
    #[serde(default)]
    pub counters: Option<replicator::status::FtCounters>,
    #[serde(default)]
    pub sync: Option<replicator::status::SyncProgress>,
    #[serde(default)]
    pub generation: Option<u64>,
    /// The primary is moving the VM to its peer by live migration.
    #[serde(default)]
    pub migrating: bool,
    /// The level the engine runs the VM at (none from a daemon before
    /// this field): after a level change, it says whether the state is
    /// already the new level's.
    #[serde(default)]
    pub level: Option<replicator::level::Level>,
}

/// One side's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairState {
    pub version: u32,
    pub node: String,
    pub unix_ms: u64,
    pub vms: Vec<VmRecord>,
    pub tombstones: Vec<Tombstone>,
    pub roles: Vec<RoleReport>,
    /// The nodes' maintenance records (absent from an older daemon).
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    /// The console's users (their password hashes; absent from an older
    /// daemon).
    #[serde(default)]
    pub users: Vec<UserRecord>,
    /// The sender takes [`MoveAsk`]s (false from an older daemon, which
    /// would end the channel on one).
    #[serde(default)]
    pub takes_moves: bool,
    /// The sender's event and audit logs (absent from an older daemon,
    /// whose logs stay its own). Read leniently: logs this daemon cannot
    /// read (a newer peer's) must not stop the pair channel, which carries
    /// the VMs.
    #[serde(default, deserialize_with = "lenient")]
    pub logs: Option<Box<LogExchange>>,
}

/// What a [`PairState`] carries of the two nodes' logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogExchange {
    /// The identity of the sender's own logs.
    pub log: String,
    /// How far the sender holds the receiver's logs (none until the
    /// sender has heard which they are).
    pub held: Option<LogMark>,
    /// The sender's own events that the receiver lacks, oldest first (at
    /// most [`LOG_BATCH`]; the rest come with the next states). An entry
    /// this daemon cannot read (a newer peer's) is left out.
    #[serde(deserialize_with = "readable_entries")]
    pub events: Vec<Event>,
    /// The same of the sender's audit log.
    #[serde(deserialize_with = "readable_entries")]
    pub audit: Vec<AuditEntry>,
}

/// Says `what` in the log once in this daemon's life (a newer peer sends
/// the same every second).
fn warn_once(said: &std::sync::atomic::AtomicBool, what: std::fmt::Arguments<'_>) {
    if !said.swap(true, std::sync::atomic::Ordering::Relaxed) {
        tracing::warn!("pair channel: {what} (said once)");
    }
}

/// `T` if the value reads as one, else none (said in the log).
fn lenient<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let value = serde_json::Value::deserialize(deserializer)?;
    if value.is_null() {
        return Ok(None);
    }
    Ok(serde_json::from_value(value)
        .map_err(|error| {
            warn_once(
                &SAID,
                format_args!("the peer's logs are not readable here (a newer peer?): {error}"),
            )
        })
        .ok())
}

/// The entries that read as `T`; an entry whose severity this daemon does
/// not know (a newer peer's) reads as a warning, as the store reads one;
/// the rest are left out (said in the log): the receiver's mark moves past
/// them, so they would not come again.
fn readable_entries<'de, D, T>(deserializer: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: serde::de::DeserializeOwned,
{
    static SAID: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let values = Vec::<serde_json::Value>::deserialize(deserializer)?;
    let sent = values.len();
    let read: Vec<T> = values
        .into_iter()
        .filter_map(|mut value| {
            serde_json::from_value(value.clone()).ok().or_else(|| {
                let severity = value.get_mut("severity")?;
                *severity = serde_json::Value::from("warning");
                serde_json::from_value(value).ok()
            })
        })
        .collect();
    if read.len() < sent {
        warn_once(
            &SAID,
            format_args!(
                "{} log entries not readable here (a newer peer?) left out",
                sent - read.len()
            ),
        );
    }
    Ok(read)
}

/// The most entries of each log one [`PairState`] carries.
pub const LOG_BATCH: usize = 500;

/// A switchover (or an HA VM's live migration) asked through the API of
/// the node that does not run the VM's primary, of the node that does.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveAsk {
    /// Names the answer (unique on the asking node).
    pub id: u64,
    pub vm: String,
    /// Who asked, as the asking node's audit log names them.
    pub by: String,
}

/// What became of a [`MoveAsk`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MoveAnswer {
    pub id: u64,
    pub outcome: MoveOutcome,
}

/// The answering node's result, as its own API would have given it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum MoveOutcome {
    /// Switched over, or (`migration`) an HA VM's live migration began.
    Moved { view: Box<VmView>, migration: bool },
    /// No such VM there.
    NotFound { reason: String },
    /// Not possible now, or called off; the reason says which.
    Refused { reason: String },
    /// The answering node failed (its store).
    Failed { reason: String },
}

/// Any message of the pair channel.
#[derive(Debug, Clone, PartialEq)]
pub enum PairMessage {
    State(PairState),
    MoveAsk(MoveAsk),
    MoveAnswer(MoveAnswer),
    /// A message code this daemon does not know (from a newer peer):
    /// skipped, the channel goes on.
    Unknown(u8),
}

fn frame_of(code: u8, value: &impl Serialize) -> Result<Frame, WireError> {
    let payload = serde_json::to_vec(value).map_err(WireError::Encode)?;
    Frame::message(code, 0, 0, Bytes::from(payload)).map_err(WireError::Frame)
}

fn decode<T: serde::de::DeserializeOwned>(frame: &Frame) -> Result<T, WireError> {
    serde_json::from_slice(&frame.payload).map_err(|source| WireError::Decode {
        len: frame.payload.len(),
        source,
    })
}

impl PairMessage {
    pub fn to_frame(&self) -> Result<Frame, WireError> {
        match self {
            PairMessage::State(s) => frame_of(STATE_CODE, s),
            PairMessage::MoveAsk(a) => frame_of(MOVE_ASK_CODE, a),
            PairMessage::MoveAnswer(a) => frame_of(MOVE_ANSWER_CODE, a),
            PairMessage::Unknown(code) => {
                Frame::message(*code, 0, 0, Bytes::new()).map_err(WireError::Frame)
            }
        }
    }

    pub fn from_frame(frame: &Frame) -> Result<PairMessage, WireError> {
        match frame.kind {
            FrameKind::Message(STATE_CODE) => {
                let state: PairState = decode(frame)?;
                if state.version != PAIR_VERSION {
                    return Err(WireError::Version(state.version));
                }
                Ok(PairMessage::State(state))
            }
            FrameKind::Message(MOVE_ASK_CODE) => decode(frame).map(PairMessage::MoveAsk),
            FrameKind::Message(MOVE_ANSWER_CODE) => decode(frame).map(PairMessage::MoveAnswer),
            FrameKind::Message(code) => Ok(PairMessage::Unknown(code)),
            other => Err(WireError::UnexpectedFrame(other)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state as JSON, with `logs` as given.
    fn state_with_logs(logs: serde_json::Value) -> serde_json::Value {
        serde_json::json!({
            "version": PAIR_VERSION, "node": "node-b", "unix_ms": 1, "vms": [],
            "tombstones": [], "roles": [], "logs": logs
        })
    }

    fn event(id: u64, severity: &str) -> serde_json::Value {
        serde_json::json!({
            "id": id, "unix_ms": 5, "node": "node-b", "severity": severity, "alert": false,
            "kind": "vm", "vm": null, "message": "m"
        })
    }

    #[test]
    fn logs_a_daemon_cannot_read_do_not_stop_the_state() {
        // A severity this daemon does not know reads as a warning; an
        // entry that does not read at all is left out.
        let mut unreadable = event(4, "info");
        unreadable.as_object_mut().unwrap().remove("message");
        let state: PairState = serde_json::from_value(state_with_logs(serde_json::json!({
            "log": "b", "held": null, "audit": [],
            "events": [event(1, "info"), event(2, "catastrophic"), event(3, "warning"), unreadable]
        })))
        .unwrap();
        let logs = state.logs.expect("the logs");
        assert_eq!(
            logs.events.iter().map(|e| e.id).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(logs.events[1].severity, crate::model::Severity::Warning);
        // Logs whose shape changed: none, and the state still reads.
        let state: PairState =
            serde_json::from_value(state_with_logs(serde_json::json!({"log": 7}))).unwrap();
        assert!(state.logs.is_none());
        // An older daemon's state (no logs).
        let mut old = state_with_logs(serde_json::Value::Null);
        old.as_object_mut().unwrap().remove("logs");
        assert!(serde_json::from_value::<PairState>(old)
            .unwrap()
            .logs
            .is_none());
    }
}
