//! What can go wrong on the relayed link, which way, and on which frames.

use std::fmt;
use std::time::Duration;

use ft_link::FrameKind;

/// A direction of the relayed link. The relay's client (the side that
/// connects to it) is the primary, its target the standby.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Primary to standby (client to target).
    Up,
    /// Standby to primary (target to client).
    Down,
    /// Both: a fault injected both ways is one fault each way.
    Both,
}

impl Direction {
    /// The single directions this one stands for.
    pub fn each(self) -> &'static [Direction] {
        match self {
            Direction::Up => &[Direction::Up],
            Direction::Down => &[Direction::Down],
            Direction::Both => &[Direction::Up, Direction::Down],
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Direction::Up => "up",
            Direction::Down => "down",
            Direction::Both => "both",
        }
    }
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A fault, injected at run time through a
/// [`RelayHandle`](crate::RelayHandle).
///
/// - Standing faults: [`Delay`](Fault::Delay) until changed (a zero delay
///   clears it) and [`Stall`](Fault::Stall) until [`Resume`](Fault::Resume).
/// - Connection faults, at once on every connection: [`Reset`](Fault::Reset)
///   and [`Fin`](Fault::Fin); given a frame kind, right after the next frame
///   of that kind is forwarded (on that frame's connection), and so does
///   `Stall`.
/// - Frame faults, each on the next frame (of the given kind, if any):
///   [`FlipByte`](Fault::FlipByte), [`Rewrite`](Fault::Rewrite), [`Drop`](Fault::Drop),
///   [`Duplicate`](Fault::Duplicate), [`Reorder`](Fault::Reorder).
///
/// Frame faults need a stream of frames; on a stream the relay could not
/// cut into frames (see [`crate::wire`]) they wait, and nothing else is
/// changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Every frame is held this long (from its last byte's arrival) before
    /// it is forwarded; order is kept.
    Delay(Duration),
    /// Nothing is read nor forwarded, the connections stay open: an
    /// unplugged cable (the sender's writes block once its buffers are
    /// full).
    Stall,
    /// Ends a stall.
    Resume,
    /// Both sockets of a connection are closed with SO_LINGER 0: each peer
    /// gets a reset (ECONNRESET).
    Reset,
    /// shutdown(Write) towards the receiver, which reads the end of the
    /// stream; what the sender sends afterwards is discarded.
    Fin,
    /// The byte `offset` of the next frame (counted from the first byte of
    /// its header, so header fields can be hit; a frame too short to have
    /// that byte is not a match) is XORed with `mask`.
    FlipByte { offset: usize, mask: u8 },
    /// As [`FlipByte`](Fault::FlipByte), then both of the frame's checks
    /// (payload and header CRCs) are computed again: the change of an
    /// attacker who knows the frame format, which only a cryptographic
    /// check (a sealed link) catches.
    Rewrite { offset: usize, mask: u8 },
    /// The next frame is not forwarded.
    Drop,
    /// The next frame is forwarded twice.
    Duplicate,
    /// The next frame is held and forwarded right after the frame that
    /// follows it. Heartbeats in between pass in their place (they come
    /// whenever the sender is idle) unless the held frame is one.
    Reorder,
}

impl Fault {
    pub fn name(&self) -> &'static str {
        match self {
            Fault::Delay(_) => "delay",
            Fault::Stall => "stall",
            Fault::Resume => "resume",
            Fault::Reset => "reset",
            Fault::Fin => "fin",
            Fault::FlipByte { .. } => "flip",
            Fault::Rewrite { .. } => "rewrite",
            Fault::Drop => "drop",
            Fault::Duplicate => "duplicate",
            Fault::Reorder => "reorder",
        }
    }
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Fault::Delay(d) => write!(f, "delay {d:?}"),
            Fault::FlipByte { offset, mask } => write!(f, "flip byte {offset} by {mask:#04x}"),
            Fault::Rewrite { offset, mask } => {
                write!(f, "rewrite byte {offset} by {mask:#04x}, checks recomputed")
            }
            other => f.write_str(other.name()),
        }
    }
}

/// The A-link's own frame kinds and the replication protocol's messages
/// (`replicator::protocol`, kinds 64-75), by name: a test or an operator
/// says "drop the next EpochEnd". The replicator's tests check that these
/// codes are its own.
pub mod kind {
    use ft_link::FrameKind;

    pub const HELLO: FrameKind = FrameKind::Hello;
    pub const CHALLENGE: FrameKind = FrameKind::Challenge;
    pub const RESPONSE: FrameKind = FrameKind::Response;
    pub const HEARTBEAT: FrameKind = FrameKind::Heartbeat;
    pub const REFUSAL: FrameKind = FrameKind::Refusal;
    pub const ACCEPTED: FrameKind = FrameKind::Accepted;
    pub const KEY_EXCHANGE: FrameKind = FrameKind::KeyExchange;
    /// On a sealed link every frame after the key exchange is one of
    /// these: the relay sees records, not the messages inside them.
    pub const SEALED: FrameKind = FrameKind::Sealed;
    pub const SYNC_BEGIN: FrameKind = FrameKind::Message(64);
    pub const SYNC_PAGES: FrameKind = FrameKind::Message(65);
    pub const SYNC_DISK: FrameKind = FrameKind::Message(66);
    pub const BACKUP: FrameKind = FrameKind::Message(67);
    pub const EPOCH_BEGIN: FrameKind = FrameKind::Message(68);
    pub const PAGES: FrameKind = FrameKind::Message(69);
    pub const DISK_WRITES: FrameKind = FrameKind::Message(70);
    pub const EPOCH_END: FrameKind = FrameKind::Message(71);
    pub const ACK: FrameKind = FrameKind::Message(72);
    pub const STOP: FrameKind = FrameKind::Message(73);
    pub const HANDOVER: FrameKind = FrameKind::Message(74);
    pub const REFUSE: FrameKind = FrameKind::Message(75);
    pub const SYNC_END: FrameKind = FrameKind::Message(76);
    pub const INBOUND: FrameKind = FrameKind::Message(77);
    pub const SWITCHOVER: FrameKind = FrameKind::Message(78);
    pub const FINAL_OUTPUT: FrameKind = FrameKind::Message(79);
    pub const EPOCH_OUTPUT: FrameKind = FrameKind::Message(83);
    pub const SYNC_HELD: FrameKind = FrameKind::Message(80);

    /// Every named kind, with its name.
    pub const NAMED: [(&str, FrameKind); 26] = [
        ("Hello", HELLO),
        ("Challenge", CHALLENGE),
        ("Response", RESPONSE),
        ("Heartbeat", HEARTBEAT),
        ("Refusal", REFUSAL),
        ("Accepted", ACCEPTED),
        ("KeyExchange", KEY_EXCHANGE),
        ("Sealed", SEALED),
        ("SyncBegin", SYNC_BEGIN),
        ("SyncPages", SYNC_PAGES),
        ("SyncDisk", SYNC_DISK),
        ("Backup", BACKUP),
        ("EpochBegin", EPOCH_BEGIN),
        ("Pages", PAGES),
        ("DiskWrites", DISK_WRITES),
        ("EpochEnd", EPOCH_END),
        ("Ack", ACK),
        ("Stop", STOP),
        ("Handover", HANDOVER),
        ("Refuse", REFUSE),
        ("SyncEnd", SYNC_END),
        ("Inbound", INBOUND),
        ("Switchover", SWITCHOVER),
        ("FinalOutput", FINAL_OUTPUT),
        ("EpochOutput", EPOCH_OUTPUT),
        ("SyncHeld", SYNC_HELD),
    ];
}

/// The kind called `name`: a name of [`kind::NAMED`] (any case, `-` and
/// `_` ignored: `EpochEnd`, `epoch-end`) or a kind byte (`71`).
pub fn frame_kind_named(name: &str) -> Option<FrameKind> {
    if let Ok(code) = name.parse::<u8>() {
        return FrameKind::try_from(code).ok();
    }
    let wanted: String = name
        .chars()
        .filter(|c| !matches!(c, '-' | '_'))
        .map(|c| c.to_ascii_lowercase())
        .collect();
    kind::NAMED
        .iter()
        .find(|(n, _)| n.to_ascii_lowercase() == wanted)
        .map(|&(_, k)| k)
}

/// A kind's name for logs (its byte when it has none).
pub fn frame_kind_name(code: u8) -> String {
    kind::NAMED
        .iter()
        .find(|(_, k)| k.code() == code)
        .map_or_else(|| format!("kind {code}"), |(n, _)| (*n).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_found_by_name_and_number() {
        assert_eq!(frame_kind_named("EpochEnd"), Some(kind::EPOCH_END));
        assert_eq!(frame_kind_named("epoch-end"), Some(kind::EPOCH_END));
        assert_eq!(frame_kind_named("disk_writes"), Some(kind::DISK_WRITES));
        assert_eq!(frame_kind_named("heartbeat"), Some(FrameKind::Heartbeat));
        assert_eq!(frame_kind_named("71"), Some(kind::EPOCH_END));
        assert_eq!(frame_kind_named("200"), Some(FrameKind::Message(200)));
        assert_eq!(frame_kind_named("20"), None);
        assert_eq!(frame_kind_named("Epoch"), None);
        assert_eq!(frame_kind_name(71), "EpochEnd");
        assert_eq!(frame_kind_name(200), "kind 200");
        for (name, kind) in kind::NAMED {
            assert_eq!(frame_kind_named(name), Some(kind));
        }
    }
}
