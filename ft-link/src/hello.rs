//! What the two nodes tell each other once authenticated: the Hello, the
//! compatibility check on it, and the Refusal a node sends when it will not
//! pair. Both travel as JSON payloads.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The protocol this node speaks (the handshake and the messages it
/// carries): a peer of another version is refused at the Hello, with both
/// versions said, instead of failing later on a message it does not know.
/// 2: epochs may carry pages as deltas (`PageDeltas`); 3: an epoch's
/// checkpoint state is encoded compactly (postcard), not as JSON; 4: it
/// may go as what changed since the epoch before's (`EpochStateDelta`);
/// 5: an epoch may carry a page audit (`EpochAudit`); 6: a page delta may
/// be from a page of zeros.
pub const PROTOCOL_VERSION: u32 = 6;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Primary,
    Standby,
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
        })
    }
}

/// The CPU features a node offers its guests, as opaque words plus a name
/// for people (e.g. the declared feature set's name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatureSummary {
    pub name: String,
    pub words: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol_version: u32,
    pub node_name: String,
    pub role: Role,
    pub cpu: CpuFeatureSummary,
    /// Fingerprint of the protected VM's configuration: both nodes must run
    /// the same VM.
    pub vm_fingerprint: String,
}

#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("could not encode the hello of node {node:?}")]
    EncodeHello {
        node: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the peer's hello ({len} bytes) is not valid")]
    DecodeHello {
        len: usize,
        #[source]
        source: serde_json::Error,
    },
    #[error("could not encode a refusal ({reason})")]
    EncodeRefusal {
        reason: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the peer's refusal ({len} bytes) is not valid")]
    DecodeRefusal {
        len: usize,
        #[source]
        source: serde_json::Error,
    },
}

/// Why two Hellos cannot pair. Names both nodes so that the message reads
/// the same on either side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Mismatch {
    #[error("protocol versions differ: node {local_node:?} speaks {local}, node {peer_node:?} speaks {peer}")]
    ProtocolVersion {
        local_node: String,
        local: u32,
        peer_node: String,
        peer: u32,
    },
    #[error("both nodes ({local_node:?} and {peer_node:?}) claim the {role} role")]
    SameRole {
        local_node: String,
        peer_node: String,
        role: Role,
    },
    #[error(
        "CPU features differ: node {local_node:?} has {local_name:?} ({local_words} words), \
         node {peer_node:?} has {peer_name:?} ({peer_words} words), differing words at {differing:?}"
    )]
    CpuFeatures {
        local_node: String,
        local_name: String,
        local_words: usize,
        peer_node: String,
        peer_name: String,
        peer_words: usize,
        /// Indexes of the words that differ (a word missing on one side
        /// counts as differing).
        differing: Vec<usize>,
    },
    #[error("VM configuration fingerprints differ: node {local_node:?} has {local:?}, node {peer_node:?} has {peer:?}")]
    VmFingerprint {
        local_node: String,
        local: String,
        peer_node: String,
        peer: String,
    },
}

/// What a node sends (as a `Refusal` frame) when it will not pair.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("authentication failed: the proof did not verify against the pair secret")]
    AuthenticationFailed,
    #[error("the nodes are incompatible: {0}")]
    Incompatible(Box<Mismatch>),
    #[error("handshake protocol violated: {0}")]
    ProtocolViolation(String),
}

impl Refusal {
    pub fn to_payload(&self) -> Result<Vec<u8>, HelloError> {
        serde_json::to_vec(self).map_err(|source| HelloError::EncodeRefusal {
            reason: self.to_string(),
            source,
        })
    }

    pub fn from_payload(payload: &[u8]) -> Result<Refusal, HelloError> {
        serde_json::from_slice(payload).map_err(|source| HelloError::DecodeRefusal {
            len: payload.len(),
            source,
        })
    }
}

impl Hello {
    pub fn new(
        node_name: impl Into<String>,
        role: Role,
        cpu: CpuFeatureSummary,
        vm_fingerprint: impl Into<String>,
    ) -> Hello {
        Hello {
            protocol_version: PROTOCOL_VERSION,
            node_name: node_name.into(),
            role,
            cpu,
            vm_fingerprint: vm_fingerprint.into(),
        }
    }

    pub fn to_payload(&self) -> Result<Vec<u8>, HelloError> {
        serde_json::to_vec(self).map_err(|source| HelloError::EncodeHello {
            node: self.node_name.clone(),
            source,
        })
    }

    pub fn from_payload(payload: &[u8]) -> Result<Hello, HelloError> {
        serde_json::from_slice(payload).map_err(|source| HelloError::DecodeHello {
            len: payload.len(),
            source,
        })
    }

    /// Whether this node (`self`) may pair with `peer`: same protocol,
    /// opposite roles, same CPU features, same VM.
    pub fn check_pairs_with(&self, peer: &Hello) -> Result<(), Box<Mismatch>> {
        let local_node = self.node_name.clone();
        let peer_node = peer.node_name.clone();
        if self.protocol_version != peer.protocol_version {
            return Err(Box::new(Mismatch::ProtocolVersion {
                local_node,
                local: self.protocol_version,
                peer_node,
                peer: peer.protocol_version,
            }));
        }
        if self.role == peer.role {
            return Err(Box::new(Mismatch::SameRole {
                local_node,
                peer_node,
                role: self.role,
            }));
        }
        if self.cpu != peer.cpu {
            let longest = self.cpu.words.len().max(peer.cpu.words.len());
            let differing = (0..longest)
                .filter(|&i| self.cpu.words.get(i) != peer.cpu.words.get(i))
                .collect();
            return Err(Box::new(Mismatch::CpuFeatures {
                local_node,
                local_name: self.cpu.name.clone(),
                local_words: self.cpu.words.len(),
                peer_node,
                peer_name: peer.cpu.name.clone(),
                peer_words: peer.cpu.words.len(),
                differing,
            }));
        }
        if self.vm_fingerprint != peer.vm_fingerprint {
            return Err(Box::new(Mismatch::VmFingerprint {
                local_node,
                local: self.vm_fingerprint.clone(),
                peer_node,
                peer: peer.vm_fingerprint.clone(),
            }));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(name: &str, role: Role) -> Hello {
        Hello::new(
            name,
            role,
            CpuFeatureSummary {
                name: "baseline-v1".into(),
                words: vec![0xdead_beef, 0x1234],
            },
            "vm-sha256:abcd",
        )
    }

    #[test]
    fn hello_and_refusal_round_trip_through_their_payloads() {
        let h = hello("a", Role::Primary);
        assert_eq!(Hello::from_payload(&h.to_payload().unwrap()).unwrap(), h);
        let r = Refusal::Incompatible(Box::new(Mismatch::VmFingerprint {
            local_node: "a".into(),
            local: "x".into(),
            peer_node: "b".into(),
            peer: "y".into(),
        }));
        assert_eq!(Refusal::from_payload(&r.to_payload().unwrap()).unwrap(), r);
        assert!(matches!(
            Hello::from_payload(b"{\"node_name\": 3}"),
            Err(HelloError::DecodeHello { len: 16, .. })
        ));
    }

    #[test]
    fn compatible_hellos_pair() {
        hello("a", Role::Primary)
            .check_pairs_with(&hello("b", Role::Standby))
            .unwrap();
    }

    #[test]
    fn each_difference_is_named() {
        let a = hello("a", Role::Primary);
        let mut b = hello("b", Role::Standby);
        b.cpu.words[1] = 0x1235;
        b.cpu.words.push(9);
        let err = a.check_pairs_with(&b).unwrap_err();
        assert!(
            matches!(&*err, Mismatch::CpuFeatures { differing, .. } if *differing == vec![1, 2]),
            "{err}"
        );
        assert!(err.to_string().contains("CPU features differ"), "{err}");

        let mut b = hello("b", Role::Standby);
        b.vm_fingerprint = "vm-sha256:ffff".into();
        let err = a.check_pairs_with(&b).unwrap_err();
        assert!(matches!(*err, Mismatch::VmFingerprint { .. }), "{err}");
        assert!(err.to_string().contains("vm-sha256:ffff"), "{err}");

        let b = hello("b", Role::Primary);
        assert!(matches!(
            a.check_pairs_with(&b).map_err(|m| *m),
            Err(Mismatch::SameRole {
                role: Role::Primary,
                ..
            })
        ));

        let mut b = hello("b", Role::Standby);
        b.protocol_version = PROTOCOL_VERSION + 1;
        assert!(matches!(
            a.check_pairs_with(&b).map_err(|m| *m),
            Err(Mismatch::ProtocolVersion {
                local: PROTOCOL_VERSION,
                peer,
                ..
            }) if peer == PROTOCOL_VERSION + 1
        ));
    }
}
