//! Mutual challenge-response authentication of the two nodes of a pair.
//!
//! Both nodes hold the same pair secret; it never goes on the wire. Each
//! side sends a fresh random 32-byte nonce (from `/dev/urandom`) and proves
//! it knows the secret by answering with
//! `HMAC-SHA256(secret, role_label || their_nonce || my_nonce)`.
//! The role label differs between the connecting and the accepting side, so
//! a proof reflected back at its author does not verify. Proofs are checked
//! in constant time.

use std::fmt;
use std::io::Read;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes in a nonce.
pub const NONCE_LEN: usize = 32;
/// Bytes in a proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;
/// The shortest pair secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

const NONCE_SOURCE: &str = "/dev/urandom";

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("pair secret of {len} bytes is too short (at least {MIN_SECRET_LEN} needed)")]
    SecretTooShort { len: usize },
    #[error("could not read a nonce from {NONCE_SOURCE}")]
    ReadNonce {
        #[source]
        source: std::io::Error,
    },
    #[error("the peer's nonce has {len} bytes, not {NONCE_LEN}")]
    MalformedNonce { len: usize },
    #[error("the proof from the {prover} side does not verify: it does not know the pair secret")]
    ProofRejected { prover: Side },
}

/// The secret shared by the two nodes of a pair. Its `Debug` output does not
/// show the bytes.
#[derive(Clone)]
pub struct PairSecret(Vec<u8>);

impl PairSecret {
    pub fn new(bytes: impl Into<Vec<u8>>) -> Result<PairSecret, AuthError> {
        let bytes = bytes.into();
        if bytes.len() < MIN_SECRET_LEN {
            return Err(AuthError::SecretTooShort { len: bytes.len() });
        }
        Ok(PairSecret(bytes))
    }

    /// The secret's bytes (for tests that check they never leak).
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    fn mac(&self) -> HmacSha256 {
        HmacSha256::new_from_slice(&self.0).expect("HMAC takes keys of any length")
    }
}

/// The pre-shared key of the A-link's key exchange ([`crate::seal`]):
/// derived from the pair secret, so that only the two nodes of the pair
/// complete it.
pub(crate) fn seal_psk(secret: &PairSecret) -> [u8; 32] {
    let mut mac = secret.mac();
    mac.update(b"ft-link A-link v1 seal psk");
    mac.finalize().into_bytes().into()
}

/// The key of one link's pulses: both sides derive it from the pair secret
/// and the two nonces of the link's handshake (the connecting side's
/// first), so each link has its own and a recorded pulse is worth nothing
/// on another.
pub fn pulse_key(secret: &PairSecret, connecting: &Nonce, accepting: &Nonce) -> [u8; 32] {
    let mut mac = secret.mac();
    mac.update(b"ft-link A-link v1 pulse key");
    mac.update(&connecting.0);
    mac.update(&accepting.0);
    mac.finalize().into_bytes().into()
}

impl fmt::Debug for PairSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PairSecret({} bytes, redacted)", self.0.len())
    }
}

/// Which end of the TCP connection a node is: the role label of its proofs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Connecting,
    Accepting,
}

impl Side {
    fn label(self) -> &'static [u8] {
        match self {
            Side::Connecting => b"ft-link A-link v1 proof of the connecting side",
            Side::Accepting => b"ft-link A-link v1 proof of the accepting side",
        }
    }

    pub fn other(self) -> Side {
        match self {
            Side::Connecting => Side::Accepting,
            Side::Accepting => Side::Connecting,
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Connecting => "connecting",
            Side::Accepting => "accepting",
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Nonce([u8; NONCE_LEN]);

impl Nonce {
    /// A fresh random nonce.
    pub fn fresh() -> Result<Nonce, AuthError> {
        let mut bytes = [0u8; NONCE_LEN];
        std::fs::File::open(NONCE_SOURCE)
            .and_then(|mut f| f.read_exact(&mut bytes))
            .map_err(|source| AuthError::ReadNonce { source })?;
        Ok(Nonce(bytes))
    }

    /// The peer's nonce as received.
    pub fn from_wire(bytes: &[u8]) -> Result<Nonce, AuthError> {
        let bytes: [u8; NONCE_LEN] = bytes
            .try_into()
            .map_err(|_| AuthError::MalformedNonce { len: bytes.len() })?;
        Ok(Nonce(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; NONCE_LEN] {
        &self.0
    }
}

impl fmt::Debug for Nonce {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Nonce(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

fn keyed_transcript(secret: &PairSecret, prover: Side, their: &Nonce, mine: &Nonce) -> HmacSha256 {
    let mut mac = secret.mac();
    mac.update(prover.label());
    mac.update(their.as_bytes());
    mac.update(mine.as_bytes());
    mac
}

/// The proof `prover` sends: it answers the peer's nonce `their` and binds
/// its own nonce `mine`.
pub fn prove(secret: &PairSecret, prover: Side, their: &Nonce, mine: &Nonce) -> [u8; PROOF_LEN] {
    keyed_transcript(secret, prover, their, mine)
        .finalize()
        .into_bytes()
        .into()
}

/// Checks, in constant time, the proof received from `prover`, who answered
/// `verifier_nonce` (ours) and bound `prover_nonce` (theirs).
pub fn verify(
    secret: &PairSecret,
    prover: Side,
    verifier_nonce: &Nonce,
    prover_nonce: &Nonce,
    proof: &[u8],
) -> Result<(), AuthError> {
    keyed_transcript(secret, prover, verifier_nonce, prover_nonce)
        .verify_slice(proof)
        .map_err(|_| AuthError::ProofRejected { prover })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(fill: u8) -> PairSecret {
        PairSecret::new(vec![fill; 32]).unwrap()
    }

    #[test]
    fn a_proof_with_the_same_secret_verifies() {
        let (nc, na) = (Nonce::fresh().unwrap(), Nonce::fresh().unwrap());
        let proof = prove(&secret(1), Side::Connecting, &na, &nc);
        verify(&secret(1), Side::Connecting, &na, &nc, &proof).unwrap();
    }

    #[test]
    fn wrong_secret_reflected_or_swapped_nonces_are_rejected() {
        let (nc, na) = (Nonce::fresh().unwrap(), Nonce::fresh().unwrap());
        let proof = prove(&secret(1), Side::Connecting, &na, &nc);
        // Another secret.
        assert!(matches!(
            verify(&secret(2), Side::Connecting, &na, &nc, &proof),
            Err(AuthError::ProofRejected {
                prover: Side::Connecting
            })
        ));
        // The connecting side's proof reflected back as the accepting side's.
        assert!(verify(&secret(1), Side::Accepting, &na, &nc, &proof).is_err());
        // Nonces swapped (a replay into the other direction).
        assert!(verify(&secret(1), Side::Connecting, &nc, &na, &proof).is_err());
        // Truncated proof.
        assert!(verify(&secret(1), Side::Connecting, &na, &nc, &proof[..31]).is_err());
    }

    #[test]
    fn nonces_are_fresh_and_checked_for_length() {
        assert_ne!(Nonce::fresh().unwrap(), Nonce::fresh().unwrap());
        assert!(matches!(
            Nonce::from_wire(&[0u8; 31]),
            Err(AuthError::MalformedNonce { len: 31 })
        ));
        assert_eq!(Nonce::from_wire(&[7u8; 32]).unwrap().as_bytes(), &[7u8; 32]);
    }

    #[test]
    fn short_secrets_are_refused_and_debug_hides_the_bytes() {
        assert!(matches!(
            PairSecret::new(vec![1u8; 15]),
            Err(AuthError::SecretTooShort { len: 15 })
        ));
        let s = PairSecret::new(b"sixteen-byte-key-plus".to_vec()).unwrap();
        let shown = format!("{s:?}");
        assert!(!shown.contains("sixteen"), "{shown}");
    }
}
