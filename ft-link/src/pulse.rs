//! Pulses: heartbeats a busy node cannot starve.
//!
//! The TCP connection's heartbeats are frames like any other: they queue
//! behind epoch data and are sent and read by async tasks that compete with
//! everything else on the node (a guest with more vCPUs than the node has
//! CPUs, an initial copy reading gigabytes). A peer declared silent while
//! it lives ends the session, or worse, promotes the standby. So each link
//! also has a pulse path: a UDP socket of its own, served by an OS thread
//! of its own at real-time priority where the system allows it, that sends
//! a small authenticated datagram every heartbeat interval and marks the
//! link's liveness when the peer's arrive. The link's silence is judged on
//! both (any byte on the connection, or a pulse).
//!
//! A pulse: `FTPL`, the sender's side (0 connecting, 1 accepting), a
//! counter (u64, big endian), and the first 16 bytes of
//! HMAC-SHA256(link key, side || counter), the link key derived from the
//! pair secret and the handshake's nonces ([`crate::auth::pulse_key`]).
//! Pulses from another address, of the wrong side, not newer than the last
//! one, or that do not verify are dropped.

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tracing::{debug, trace};

use crate::auth::Side;
use crate::link::Liveness;

const MAGIC: &[u8; 4] = b"FTPL";
const TAG_LEN: usize = 16;
/// Bytes in a pulse.
pub const PULSE_LEN: usize = 4 + 1 + 8 + TAG_LEN;

/// The real-time priority of the pulse threads (SCHED_FIFO, low: above
/// every ordinary thread, below the kernel's own).
const PULSE_PRIORITY: i32 = 10;

fn side_byte(side: Side) -> u8 {
    match side {
        Side::Connecting => 0,
        Side::Accepting => 1,
    }
}

fn tag(key: &[u8; 32], side: u8, counter: u64) -> [u8; TAG_LEN] {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(&[side]);
    mac.update(&counter.to_be_bytes());
    let full = mac.finalize().into_bytes();
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(&full[..TAG_LEN]);
    out
}

/// The pulse `side` sends as its `counter`-th.
pub fn encode(key: &[u8; 32], side: Side, counter: u64) -> [u8; PULSE_LEN] {
    let mut out = [0u8; PULSE_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = side_byte(side);
    out[5..13].copy_from_slice(&counter.to_be_bytes());
    out[13..].copy_from_slice(&tag(key, side_byte(side), counter));
    out
}

/// The counter of a pulse from `side`, if it is one and verifies.
pub fn decode(key: &[u8; 32], side: Side, bytes: &[u8]) -> Option<u64> {
    if bytes.len() != PULSE_LEN || &bytes[..4] != MAGIC || bytes[4] != side_byte(side) {
        return None;
    }
    let counter = u64::from_be_bytes(bytes[5..13].try_into().ok()?);
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes keys of any length");
    mac.update(&[side_byte(side)]);
    mac.update(&counter.to_be_bytes());
    mac.verify_truncated_left(&bytes[13..]).ok()?;
    Some(counter)
}

/// A link's pulse socket, bound before the handshake (its port goes to the
/// peer in the `Accepted` frame).
pub struct PulseSocket {
    socket: UdpSocket,
}

impl PulseSocket {
    /// Binds a UDP socket on `local` (the address of the link's TCP end).
    pub fn bind(local: IpAddr) -> std::io::Result<PulseSocket> {
        Ok(PulseSocket {
            socket: UdpSocket::bind(SocketAddr::new(local, 0))?,
        })
    }

    pub fn port(&self) -> u16 {
        self.socket.local_addr().map_or(0, |a| a.port())
    }
}

/// The running pulses of one link; they stop when this is dropped.
pub struct Pulses {
    stop: Arc<AtomicBool>,
}

impl Drop for Pulses {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a pulse thread needs.
pub struct PulseConfig {
    pub key: [u8; 32],
    /// This end's side of the link.
    pub side: Side,
    /// Where the peer's pulses come from and ours go.
    pub peer: SocketAddr,
    pub interval: Duration,
}

impl Pulses {
    /// Starts the pulse thread of a link: it sends a pulse every interval
    /// and marks `liveness` when a valid one of the peer's arrives.
    pub fn start(
        socket: PulseSocket,
        config: PulseConfig,
        liveness: Liveness,
    ) -> std::io::Result<Pulses> {
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        std::thread::Builder::new()
            .name("ft-link-pulse".into())
            .spawn(move || run(socket.socket, config, liveness, &stopping))?;
        Ok(Pulses { stop })
    }
}

/// Raises the calling thread to real-time priority if the system allows
/// it (it does for root); an ordinary thread otherwise.
fn raise_priority() {
    let param = libc::sched_param {
        sched_priority: PULSE_PRIORITY,
    };
    // SAFETY: sched_setscheduler(2) on the calling thread (pid 0) with a
    // valid, initialised parameter; it touches no memory of ours.
    let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if rc != 0 {
        debug!(
            error = %std::io::Error::last_os_error(),
            "pulses run at normal priority"
        );
    }
}

fn run(socket: UdpSocket, config: PulseConfig, liveness: Liveness, stop: &AtomicBool) {
    raise_priority();
    let peer_side = config.side.other();
    let mut sent = 0u64;
    let mut newest = 0u64;
    let mut next_send = Instant::now();
    let mut buf = [0u8; 64];
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        if now >= next_send {
            sent += 1;
            if let Err(error) = socket.send_to(&encode(&config.key, config.side, sent), config.peer)
            {
                trace!(peer = %config.peer, %error, "pulse not sent");
            }
            next_send = now + config.interval;
        }
        let wait = next_send
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        if socket.set_read_timeout(Some(wait)).is_err() {
            std::thread::sleep(wait);
            continue;
        }
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from.ip() == config.peer.ip() => {
                match decode(&config.key, peer_side, &buf[..n]) {
                    Some(counter) if counter > newest => {
                        newest = counter;
                        liveness.mark_pulse();
                    }
                    _ => trace!(%from, "pulse dropped"),
                }
            }
            Ok((_, from)) => trace!(%from, "pulse from a stranger dropped"),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(error) => {
                // E.g. ICMP unreachable reported on the socket: go on.
                trace!(%error, "pulse receive failed");
                std::thread::sleep(wait);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pulse_verifies_only_with_its_key_and_side() {
        let key = [7u8; 32];
        let pulse = encode(&key, Side::Connecting, 42);
        assert_eq!(decode(&key, Side::Connecting, &pulse), Some(42));
        assert_eq!(decode(&key, Side::Accepting, &pulse), None, "reflected");
        assert_eq!(
            decode(&[8u8; 32], Side::Connecting, &pulse),
            None,
            "other link"
        );
        let mut forged = pulse;
        forged[12] ^= 1; // another counter, the old tag
        assert_eq!(decode(&key, Side::Connecting, &forged), None);
        assert_eq!(decode(&key, Side::Connecting, &pulse[..20]), None);
    }
}
