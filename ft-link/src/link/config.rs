//! How a node opens and keeps its end of the A-link: [`LinkConfig`] and the
//! timeouts that go with it.

use std::time::Duration;

use crate::auth::PairSecret;
use crate::hello::Hello;
use crate::seal::Protection;

/// The peer is declared silent after this much silence (the one default of
/// the project: `ftprotect --heartbeat-timeout-ms` and `ftd`'s
/// `heartbeat_timeout_ms` use it too). 200 ms: the `false_silence` bench
/// saw no false silence at it in the lab (nested TCG, a busy guest); it is
/// most of a failover's time.
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(200);
/// [`heartbeat_interval_for`] the default timeout (40 ms).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = heartbeat_interval_for(DEFAULT_HEARTBEAT_TIMEOUT);
/// Heartbeats never go out more often than this.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// How a node opens and keeps its end of the A-link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub secret: PairSecret,
    /// What this node tells the peer.
    pub hello: Hello,
    /// A heartbeat goes out when nothing was sent for this long.
    pub heartbeat_interval: Duration,
    /// The peer is declared silent when nothing arrived for this long.
    pub heartbeat_timeout: Duration,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
    /// A send fails when the peer took nothing for this long (a hung peer
    /// whose kernel still answers window probes would otherwise block it
    /// forever); see [`send_stall_timeout_for`].
    pub send_stall_timeout: Duration,
    /// Pulses (heartbeats on a socket and a thread of their own) when the
    /// peer offers them too.
    pub pulses: bool,
    /// Sealed (the default) or, by explicit choice on both nodes for a
    /// dedicated cable, plaintext; see [`crate::seal`]. Both ends must
    /// agree: a mismatch is refused at the handshake, saying so.
    pub protection: Protection,
}

/// The send stall timeout that goes with a heartbeat timeout: four times
/// it, at least [`MIN_SEND_STALL_TIMEOUT`] (a standby applying a large
/// epoch may stop reading for a moment; a dead one never resumes).
pub fn send_stall_timeout_for(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout * 4).max(MIN_SEND_STALL_TIMEOUT)
}

/// The shortest send stall timeout (the default heartbeat timeout's: a
/// standby that applies a large epoch under load may not read for most of
/// a second; a shorter heartbeat timeout does not make that shorter).
pub const MIN_SEND_STALL_TIMEOUT: Duration = Duration::from_millis(1200);

impl LinkConfig {
    pub fn new(secret: PairSecret, hello: Hello) -> LinkConfig {
        LinkConfig {
            secret,
            hello,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            send_stall_timeout: send_stall_timeout_for(DEFAULT_HEARTBEAT_TIMEOUT),
            pulses: true,
            protection: Protection::Sealed,
        }
    }

    /// Declares the peer silent after `timeout`, with heartbeats every
    /// [`heartbeat_interval_for`] it.
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> LinkConfig {
        self.heartbeat_timeout = timeout;
        self.send_stall_timeout = send_stall_timeout_for(timeout);
        self.heartbeat_interval = heartbeat_interval_for(timeout);
        self
    }
}

/// The heartbeat interval that goes with a heartbeat timeout: a fifth of it
/// (four heartbeats in a row may be lost before the peer is declared
/// silent), but at least [`MIN_HEARTBEAT_INTERVAL`].
pub const fn heartbeat_interval_for(timeout: Duration) -> Duration {
    let fifth = Duration::from_nanos((timeout.as_nanos() / 5) as u64);
    if fifth.as_nanos() < MIN_HEARTBEAT_INTERVAL.as_nanos() {
        MIN_HEARTBEAT_INTERVAL
    } else {
        fifth
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::Role;
    use crate::link::tests::{config, SECRET};

    #[test]
    fn heartbeat_interval_is_a_fifth_of_the_timeout_at_least_10_ms() {
        let ms = Duration::from_millis;
        assert_eq!(DEFAULT_HEARTBEAT_TIMEOUT, ms(200));
        assert_eq!(DEFAULT_HEARTBEAT_INTERVAL, ms(40));
        assert_eq!(heartbeat_interval_for(ms(1000)), ms(200));
        assert_eq!(heartbeat_interval_for(ms(30)), ms(10));
        let c = config("a", Role::Primary, SECRET).with_heartbeat_timeout(ms(500));
        assert_eq!(
            (c.heartbeat_timeout, c.heartbeat_interval),
            (ms(500), ms(100))
        );
        let d = LinkConfig::new(c.secret.clone(), c.hello.clone());
        assert_eq!(
            (d.heartbeat_timeout, d.heartbeat_interval),
            (DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL)
        );
    }
}
