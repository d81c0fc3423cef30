//! What nodes ask the witness and what it answers: JSON in A-link message
//! frames (requests code 96, answers code 97), each answer carrying its
//! request's id. The A-link's handshake has authenticated both ends with
//! the pair secret; the Hello names the asking node.

use bytes::Bytes;
use ft_link::{CpuFeatureSummary, Frame, FrameKind, Hello, Role};
use serde::{Deserialize, Serialize};

/// The witness protocol's version.
pub const WITNESS_VERSION: u32 = 1;
/// The message code of a request frame.
pub const REQUEST_CODE: u8 = 96;
/// The message code of an answer frame.
pub const ANSWER_CODE: u8 = 97;
/// What both ends put in the Hello's VM fingerprint field.
pub const WITNESS_CHANNEL: &str = "ftwitness/1";

/// The Hello of a node asking the witness (the link's "primary" side).
pub fn client_hello(node: &str) -> Hello {
    Hello::new(node, Role::Primary, no_cpu(), WITNESS_CHANNEL)
}

/// The witness's own Hello (the link's "standby" side).
pub fn witness_hello(name: &str) -> Hello {
    Hello::new(name, Role::Standby, no_cpu(), WITNESS_CHANNEL)
}

fn no_cpu() -> CpuFeatureSummary {
    CpuFeatureSummary {
        name: "witness".into(),
        words: vec![],
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("cannot encode a witness message: {0}")]
    Encode(serde_json::Error),
    #[error("cannot frame a witness message: {0}")]
    Frame(ft_link::FrameError),
    #[error("a {0:?} frame is not a witness message")]
    UnexpectedFrame(FrameKind),
    #[error("a witness message ({len} bytes) is not valid: {source}")]
    Decode {
        len: usize,
        source: serde_json::Error,
    },
    #[error("the other end speaks witness protocol {0}, this one {WITNESS_VERSION}")]
    Version(u32),
}

/// What a node asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// "I run `vm` at `generation`": renews the asking primary's lease (and
    /// keeps it heard). Sent all the time by a primary.
    Hold { vm: String, generation: u64 },
    /// "My standby is gone; may I go on alone?": the primary of
    /// `generation` asks before releasing output its standby never
    /// acknowledged. Confirmed with a new generation, which makes the lost
    /// standby's replica unpromotable.
    Confirm { vm: String, generation: u64 },
    /// "The primary of `generation` fell silent; may I take over?": a
    /// standby holding a replica of `generation` asks for the next one.
    Claim { vm: String, generation: u64 },
    /// The operator's override: the next generation goes to the asking
    /// node at once (when the witness cannot hear the owner but the owner
    /// is known to be dead, e.g. after the witness lost its records).
    Force { vm: String },
    /// "I hand `vm` over to my standby" (a planned switchover): the owner
    /// of `generation`, its output of that generation all acknowledged by
    /// its standby and its guest stopped for good, lets the standby's claim
    /// be granted at once instead of after the owner's silence. A `Hold`
    /// at the same generation by the owner takes it back (the switchover
    /// failed before the standby claimed).
    Release { vm: String, generation: u64 },
    /// Every record, and how long a claim waits for silence.
    Show,
}

impl Request {
    /// The VM the request is about (none for `Show`).
    pub fn vm(&self) -> Option<&str> {
        match self {
            Request::Hold { vm, .. }
            | Request::Confirm { vm, .. }
            | Request::Claim { vm, .. }
            | Request::Release { vm, .. }
            | Request::Force { vm } => Some(vm),
            Request::Show => None,
        }
    }
}

/// One VM as the witness knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub vm: String,
    pub generation: u64,
    pub owner: String,
    pub updated_unix_ms: u64,
    /// How long ago the owner was last heard about this VM (none: not
    /// since the witness started).
    pub owner_heard_ms_ago: Option<u64>,
}

/// What the witness answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub enum Answer {
    /// Hold: the asking node owns `generation`; it may release output
    /// without a standby for `lease_ms` from when it sent the request.
    Held { generation: u64, lease_ms: u64 },
    /// Confirm: go on alone at `generation` (a new one), under a lease.
    Confirmed { generation: u64, lease_ms: u64 },
    /// Claim or Force: the asking node owns `generation` now. A claim's
    /// grant is also the new owner's first lease: it may release output
    /// without a standby for `lease_ms` from when it sent the request (0:
    /// no lease, as from a forced grant or an older witness; the first
    /// `Hold` gives one).
    Granted {
        generation: u64,
        #[serde(default)]
        lease_ms: u64,
    },
    /// Release: the next claim over `generation` is granted at once.
    Released { generation: u64 },
    /// Claim: the owner is still heard (`heard_ms_ago` ago); ask again.
    OwnerHeard { owner: String, heard_ms_ago: u64 },
    /// The asking node's generation is over: `owner` runs the VM at
    /// `generation`. A primary stops its copy; a standby drops its replica.
    Superseded { generation: u64, owner: String },
    /// Show.
    Records {
        records: Vec<Record>,
        silence_ms: u64,
    },
    /// The request could not be served (bad input, the store failed).
    Refused { reason: String },
}

#[derive(Debug, Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    id: u64,
    #[serde(flatten)]
    body: T,
}

fn to_frame<T: Serialize>(code: u8, id: u64, body: T) -> Result<Frame, ProtocolError> {
    let envelope = Envelope {
        version: WITNESS_VERSION,
        id,
        body,
    };
    let payload = serde_json::to_vec(&envelope).map_err(ProtocolError::Encode)?;
    Frame::message(code, 0, 0, Bytes::from(payload)).map_err(ProtocolError::Frame)
}

fn from_frame<T: for<'de> Deserialize<'de>>(
    code: u8,
    frame: &Frame,
) -> Result<(u64, T), ProtocolError> {
    if frame.kind != FrameKind::Message(code) {
        return Err(ProtocolError::UnexpectedFrame(frame.kind));
    }
    let envelope: Envelope<T> =
        serde_json::from_slice(&frame.payload).map_err(|source| ProtocolError::Decode {
            len: frame.payload.len(),
            source,
        })?;
    if envelope.version != WITNESS_VERSION {
        return Err(ProtocolError::Version(envelope.version));
    }
    Ok((envelope.id, envelope.body))
}

impl Request {
    pub fn to_frame(&self, id: u64) -> Result<Frame, ProtocolError> {
        to_frame(REQUEST_CODE, id, self)
    }

    pub fn from_frame(frame: &Frame) -> Result<(u64, Request), ProtocolError> {
        from_frame(REQUEST_CODE, frame)
    }
}

impl Answer {
    pub fn to_frame(&self, id: u64) -> Result<Frame, ProtocolError> {
        to_frame(ANSWER_CODE, id, self)
    }

    pub fn from_frame(frame: &Frame) -> Result<(u64, Answer), ProtocolError> {
        from_frame(ANSWER_CODE, frame)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip() {
        let requests = [
            Request::Hold {
                vm: "db".into(),
                generation: 3,
            },
            Request::Confirm {
                vm: "db".into(),
                generation: 3,
            },
            Request::Claim {
                vm: "db".into(),
                generation: 3,
            },
            Request::Force { vm: "db".into() },
            Request::Release {
                vm: "db".into(),
                generation: 7,
            },
            Request::Show,
        ];
        for (id, r) in requests.iter().enumerate() {
            let frame = r.to_frame(id as u64).unwrap();
            assert_eq!(Request::from_frame(&frame).unwrap(), (id as u64, r.clone()));
        }
        let answer = Answer::Superseded {
            generation: 4,
            owner: "b".into(),
        };
        let frame = answer.to_frame(9).unwrap();
        assert_eq!(Answer::from_frame(&frame).unwrap(), (9, answer));
    }

    #[test]
    fn a_wrong_version_kind_or_body_is_refused() {
        let frame = Frame::message(
            REQUEST_CODE,
            0,
            0,
            Bytes::from_static(br#"{"version":2,"id":1,"op":"show"}"#),
        )
        .unwrap();
        assert!(matches!(
            Request::from_frame(&frame),
            Err(ProtocolError::Version(2))
        ));
        let frame = Frame::message(
            REQUEST_CODE,
            0,
            0,
            Bytes::from_static(br#"{"version":1,"id":1,"op":"steal"}"#),
        )
        .unwrap();
        assert!(matches!(
            Request::from_frame(&frame),
            Err(ProtocolError::Decode { .. })
        ));
        let answer = Answer::Refused { reason: "x".into() }.to_frame(1).unwrap();
        assert!(matches!(
            Request::from_frame(&answer),
            Err(ProtocolError::UnexpectedFrame(_))
        ));
    }
}
