//! Frames for the guest that reach this node while it stands by.
//!
//! While the primary runs, the business network delivers the guest's
//! frames to the primary's node only: the switch learned the guest's MACs
//! on that node's port. When that node dies, its port goes down, the switch
//! forgets what it learned there, and floods frames for those MACs to every
//! other port: this node's NIC receives the requests that the guest's peers
//! sent after the primary died. Those requests reached no one else (the
//! primary could not forward them over the A-link), so without them the
//! promoted guest answers only once each peer's own TCP retransmission
//! timer fires (0.2 s at the least, then doubling).
//!
//! Overhearing keeps the frames addressed to the guest's MACs that arrive
//! on any interface of this node (a kernel filter picks them; frames this
//! node sends are left out) for a short window, bounded in memory. A
//! promotion takes them once its TAPs are up on the bridge and the guest
//! was announced there (from then on the guest receives such frames
//! itself) and gives them to the guest after the frames the A-link
//! forwarded. A frame caught from when the TAPs began to come up may have
//! reached the guest through its TAP as well: of those, only TCP segments
//! are given (a segment that arrives twice is dropped by TCP; a datagram
//! must not arrive twice). A frame that also came over the A-link (the
//! primary received it too: a switch that had not learned the MAC yet
//! floods while the primary lives) is not given twice; nor is one seen on
//! two interfaces (a bond and its member).

use std::collections::{HashSet, VecDeque};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, Protocol, SockFilter, Socket, Type};
use tracing::{debug, info, warn};
use vmm::replication::is_tcp;

/// Frames older than this when a promotion takes them are dropped: the
/// primary's loss is detected and the replica promoted well within it.
pub const OVERHEARD_WINDOW: Duration = Duration::from_secs(3);

/// Bytes of overheard frames kept; the oldest go first.
pub const OVERHEARD_BYTES_MAX: usize = 8 << 20;

/// The virtio-net header the VMM's NICs carry before each frame (with
/// `num_buffers`, which the device sets).
const GUEST_HDR_LEN: usize = 12;
/// The header the kernel puts before each frame on a packet socket with
/// `PACKET_VNET_HDR` (no `num_buffers`).
const SOCKET_HDR_LEN: usize = 10;
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
const VIRTIO_NET_HDR_GSO_NONE: u8 = 0;

/// The most NICs overheard (the rest are not).
const MACS_MAX: usize = 32;

/// How often the capture thread looks whether it should stop.
const POLL: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum OverhearError {
    #[error(
        "opening a packet socket to overhear the guest's frames failed (needs CAP_NET_RAW): {0}"
    )]
    Socket(#[source] std::io::Error),
    #[error("asking the kernel for the frames' virtio-net headers failed: {0}")]
    VnetHeader(#[source] std::io::Error),
    #[error("attaching the filter for the guest's MACs failed: {0}")]
    Filter(#[source] std::io::Error),
    #[error("setting the packet socket up failed: {0}")]
    Setup(#[source] std::io::Error),
    #[error("starting the overhearing thread failed: {0}")]
    Thread(#[source] std::io::Error),
}

/// One overheard frame: when, for which NIC, and the frame as the guest's
/// NIC receives it (its virtio-net header first).
struct Heard {
    at: Instant,
    nic: usize,
    digest: u32,
    frame: Bytes,
}

#[derive(Default)]
struct Kept {
    frames: VecDeque<Heard>,
    bytes: usize,
    /// Frames left out: segmentation offloads (a frame the guest's NIC
    /// could not take as it is), or pushed out by the bound.
    dropped: u64,
}

impl Kept {
    fn push(&mut self, heard: Heard) {
        self.bytes += heard.frame.len();
        self.frames.push_back(heard);
        let cutoff = Instant::now().checked_sub(OVERHEARD_WINDOW);
        while let Some(front) = self.frames.front() {
            let old = cutoff.is_some_and(|c| front.at < c);
            if !old && self.bytes <= OVERHEARD_BYTES_MAX {
                break;
            }
            if !old {
                self.dropped += 1;
            }
            self.bytes -= front.frame.len();
            self.frames.pop_front();
        }
    }
}

struct Shared {
    kept: Mutex<Kept>,
    stop: AtomicBool,
}

/// Overhearing the frames for the guest's MACs, from its start until it is
/// taken or dropped.
pub struct Overhearing {
    shared: Arc<Shared>,
    macs: Vec<[u8; 6]>,
}

/// What a promotion gives the guest from overhearing, per NIC, in the order
/// the frames arrived.
#[derive(Debug, Default)]
pub struct OverheardFrames {
    pub per_nic: Vec<Vec<Bytes>>,
    /// Frames left out because the A-link had forwarded them already.
    pub forwarded: u64,
    /// Frames left out because another copy was given (the same frame on
    /// two interfaces).
    pub copies: u64,
    /// Frames left out as too old: past the window, or from before the
    /// primary was lost.
    pub stale: u64,
    /// Frames other than TCP left out because they came once the TAPs were
    /// coming up, and may have reached the guest through them.
    pub maybe_delivered: u64,
    /// Frames the capture could not keep (see [`Kept::dropped`]).
    pub dropped: u64,
}

impl OverheardFrames {
    pub fn total(&self) -> u64 {
        self.per_nic.iter().map(|f| f.len() as u64).sum()
    }
}

/// Frames captured before this are the primary's, heard at `heard`.
fn cut_for(heard: Instant) -> Instant {
    heard.checked_sub(OVERHEARD_BEFORE_SILENCE).unwrap_or(heard)
}

/// Overhearing as a promotion finds it, with the digests of the frames
/// the A-link forwarded lately.
pub struct Overheard {
    pub hearing: Overhearing,
    /// Frames captured before this are left out: the primary was alive
    /// then, and got them itself (a switch that floods while it lives).
    pub since: Instant,
    pub forwarded: HashSet<u32>,
}

/// Frames for the guest overheard this long before the primary's last
/// arrival are given to the promoted guest too (the primary's port went
/// down at its death, at most a link's latency before that arrival).
const OVERHEARD_BEFORE_SILENCE: Duration = Duration::from_millis(20);

impl Overheard {
    /// What `hearing` kept for a promotion after the primary was last
    /// heard at `primary_heard`.
    pub fn new(hearing: Overhearing, primary_heard: Instant, forwarded: HashSet<u32>) -> Overheard {
        Overheard {
            hearing,
            since: cut_for(primary_heard),
            forwarded,
        }
    }

    /// See [`Overhearing::take`].
    pub fn take(self, tcp_only_from: Instant) -> OverheardFrames {
        self.hearing
            .take(self.since, &self.forwarded, tcp_only_from)
    }
}

impl Overhearing {
    /// Starts overhearing frames for `macs` (the guest's NICs, in device
    /// order) on every interface of this node.
    pub fn start(macs: &[[u8; 6]]) -> Result<Overhearing, OverhearError> {
        // The filter's jumps are 8 bits: 4 instructions per MAC.
        let macs = &macs[..macs.len().min(MACS_MAX)];
        let protocol = Protocol::from(i32::from((libc::ETH_P_ALL as u16).to_be()));
        let socket = Socket::new(Domain::PACKET, Type::RAW, Some(protocol))
            .map_err(OverhearError::Socket)?;
        enable_vnet_header(&socket).map_err(OverhearError::VnetHeader)?;
        socket
            .attach_filter(&filter_for(macs))
            .map_err(OverhearError::Filter)?;
        drain(&socket).map_err(OverhearError::Setup)?;
        socket
            .set_read_timeout(Some(POLL))
            .map_err(OverhearError::Setup)?;
        let shared = Arc::new(Shared {
            kept: Mutex::default(),
            stop: AtomicBool::new(false),
        });
        let thread_shared = Arc::clone(&shared);
        let thread_macs = macs.to_vec();
        std::thread::Builder::new()
            .name("ft-overhear".into())
            .spawn(move || capture(socket, &thread_macs, &thread_shared))
            .map_err(OverhearError::Thread)?;
        debug!(
            nics = macs.len(),
            "overhearing the guest's frames on this node"
        );
        Ok(Overhearing {
            shared,
            macs: macs.to_vec(),
        })
    }

    /// Stops overhearing and hands over the frames captured since `since`
    /// (and within the last [`OVERHEARD_WINDOW`]), leaving out those whose
    /// digest (see [`frame_digest`]) is in `forwarded`, repeated copies,
    /// and those other than TCP captured from `tcp_only_from` on (when the
    /// guest's TAPs began to come up: such a frame may have reached it).
    pub fn take(
        self,
        since: Instant,
        forwarded: &HashSet<u32>,
        tcp_only_from: Instant,
    ) -> OverheardFrames {
        self.shared.stop.store(true, Ordering::Relaxed);
        let kept = std::mem::take(&mut *self.shared.kept.lock().expect("overheard frames lock"));
        let cutoff = Instant::now().checked_sub(OVERHEARD_WINDOW);
        let mut taken = OverheardFrames {
            per_nic: vec![Vec::new(); self.macs.len()],
            dropped: kept.dropped,
            ..OverheardFrames::default()
        };
        let mut given = HashSet::new();
        for heard in kept.frames {
            if cutoff.is_some_and(|c| heard.at < c) || heard.at < since {
                taken.stale += 1;
            } else if forwarded.contains(&heard.digest) {
                taken.forwarded += 1;
            } else if heard.at >= tcp_only_from
                && !is_tcp(heard.frame.get(GUEST_HDR_LEN..).unwrap_or(&[]))
            {
                taken.maybe_delivered += 1;
            } else if !given.insert(heard.digest) {
                taken.copies += 1;
            } else {
                taken.per_nic[heard.nic].push(heard.frame);
            }
        }
        if taken.total() > 0
            || taken.forwarded > 0
            || taken.dropped > 0
            || taken.maybe_delivered > 0
        {
            info!(
                frames = taken.total(),
                forwarded = taken.forwarded,
                copies = taken.copies,
                stale = taken.stale,
                maybe_delivered = taken.maybe_delivered,
                dropped = taken.dropped,
                "frames for the guest overheard on this node while standing by"
            );
        }
        taken
    }
}

impl Drop for Overhearing {
    fn drop(&mut self) {
        // The thread sees it within POLL and ends, closing its socket.
        self.shared.stop.store(true, Ordering::Relaxed);
    }
}

/// The digest that tells an overheard frame and a forwarded one apart:
/// CRC-32 of the Ethernet frame (the virtio-net header left out: the two
/// paths may fill it differently). A collision only leaves a frame out,
/// which the guest's peer then sends again, as without overhearing.
pub fn frame_digest(frame_with_guest_header: &[u8]) -> u32 {
    crc32fast::hash(frame_with_guest_header.get(GUEST_HDR_LEN..).unwrap_or(&[]))
}

/// The most frames [`drain`] reads away: more than a default receive
/// buffer holds, so that a link whose guest frames keep coming cannot keep
/// it reading.
const DRAIN_MAX: usize = 4096;

/// Reads away what the socket took before its filter was attached (any
/// frame at all, outgoing ones too), up to [`DRAIN_MAX`] frames. What it
/// leaves is harmless: the capture keeps only frames for the guest's MACs,
/// and a promotion drops those from before the primary was last heard.
fn drain(socket: &Socket) -> std::io::Result<()> {
    socket.set_nonblocking(true)?;
    let mut buf = vec![0u8; SOCKET_HDR_LEN + 65536];
    let mut read = 0;
    while read < DRAIN_MAX {
        match (&*socket).read(&mut buf) {
            Ok(_) => read += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    if read == DRAIN_MAX {
        debug!(
            frames = read,
            "stopped reading away the frames from before the filter"
        );
    }
    socket.set_nonblocking(false)
}

fn enable_vnet_header(socket: &Socket) -> std::io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: PACKET_VNET_HDR reads one int through the pointer, which
    // points at `on` for the call; the descriptor is the socket's own.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_VNET_HDR,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// A classic BPF program that accepts a frame whose destination is one of
/// `macs` and that this node did not send, whole, and refuses the rest.
fn filter_for(macs: &[[u8; 6]]) -> Vec<SockFilter> {
    const LD_W_ABS: u16 = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    const LD_H_ABS: u16 = (libc::BPF_LD | libc::BPF_H | libc::BPF_ABS) as u16;
    const JEQ_K: u16 = (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16;
    const RET_K: u16 = (libc::BPF_RET | libc::BPF_K) as u16;
    const PKTTYPE: u32 = (libc::SKF_AD_OFF + libc::SKF_AD_PKTTYPE) as u32;
    const ACCEPT: u32 = 0x0004_0000;
    let mut program = vec![
        SockFilter::new(LD_W_ABS, 0, 0, PKTTYPE),
        // Outgoing: jump to the refusal (the last instruction but one, so
        // skip the 4 instructions per MAC).
        SockFilter::new(
            JEQ_K,
            (4 * macs.len()) as u8,
            0,
            libc::PACKET_OUTGOING as u32,
        ),
    ];
    for (i, mac) in macs.iter().enumerate() {
        let left = macs.len() - i - 1;
        let high = u32::from_be_bytes([mac[0], mac[1], mac[2], mac[3]]);
        let low = u32::from(u16::from_be_bytes([mac[4], mac[5]]));
        // From each comparison: on a match go on, else to the next MAC
        // (or the refusal); the last match jumps to the acceptance.
        program.push(SockFilter::new(LD_W_ABS, 0, 0, 0));
        program.push(SockFilter::new(JEQ_K, 0, 2, high));
        program.push(SockFilter::new(LD_H_ABS, 0, 0, 4));
        program.push(SockFilter::new(JEQ_K, (4 * left + 1) as u8, 0, low));
    }
    program.push(SockFilter::new(RET_K, 0, 0, 0));
    program.push(SockFilter::new(RET_K, 0, 0, ACCEPT));
    program
}

fn capture(socket: Socket, macs: &[[u8; 6]], shared: &Shared) {
    let mut buf = vec![0u8; SOCKET_HDR_LEN + 65536];
    while !shared.stop.load(Ordering::Relaxed) {
        let len = match (&socket).read(&mut buf) {
            Ok(len) => len,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(error) => {
                warn!(%error, "overhearing the guest's frames stopped: reading the packet socket failed");
                return;
            }
        };
        let Some(frame) = guest_frame(&buf[..len]) else {
            shared.kept.lock().expect("overheard frames lock").dropped += 1;
            continue;
        };
        let dst = &frame[GUEST_HDR_LEN..GUEST_HDR_LEN + 6];
        let Some(nic) = macs.iter().position(|m| m == dst) else {
            continue;
        };
        let heard = Heard {
            at: Instant::now(),
            nic,
            digest: frame_digest(&frame),
            frame: Bytes::from(frame),
        };
        shared
            .kept
            .lock()
            .expect("overheard frames lock")
            .push(heard);
    }
}

/// The frame as the guest's NIC takes it, from what the packet socket gave
/// (its virtio-net header, then the Ethernet frame): a checksum the sender
/// left to offload is completed here (the guest's NIC offers no checksum
/// offload), and a segmentation-offload frame is refused (None).
fn guest_frame(read: &[u8]) -> Option<Vec<u8>> {
    if read.len() < SOCKET_HDR_LEN + 14 {
        return None;
    }
    let (hdr, ethernet) = read.split_at(SOCKET_HDR_LEN);
    let flags = hdr[0];
    let gso_type = hdr[1];
    if gso_type != VIRTIO_NET_HDR_GSO_NONE {
        return None;
    }
    let mut frame = vec![0u8; GUEST_HDR_LEN];
    frame.extend_from_slice(ethernet);
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 {
        let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
        let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
        complete_checksum(&mut frame[GUEST_HDR_LEN..], start, offset)?;
    }
    Some(frame)
}

/// Completes a checksum left to offload: the field at `start + offset`
/// holds the pseudo-header's sum; the checksum covers `start..` with it.
fn complete_checksum(ethernet: &mut [u8], start: usize, offset: usize) -> Option<()> {
    let field = start.checked_add(offset)?;
    if field + 2 > ethernet.len() {
        return None;
    }
    let mut sum: u32 = 0;
    let mut words = ethernet[start..].chunks_exact(2);
    for word in &mut words {
        sum += u32::from(u16::from_be_bytes([word[0], word[1]]));
    }
    if let [last] = words.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    // A sum of zero is sent as its other form (0 means "no checksum" to
    // UDP; either form checks the same for TCP).
    let checksum = match !(sum as u16) {
        0 => 0xffff,
        c => c,
    };
    ethernet[field..field + 2].copy_from_slice(&checksum.to_be_bytes());
    Some(())
}

#[cfg(test)]
mod tests {
    use std::net::UdpSocket;
    use std::process::Command;

    use super::*;

    fn heard(age: Duration, nic: usize, payload: &[u8]) -> Heard {
        let mut frame = vec![0u8; GUEST_HDR_LEN + 14];
        frame.extend_from_slice(payload);
        Heard {
            at: Instant::now() - age,
            nic,
            digest: frame_digest(&frame),
            frame: Bytes::from(frame),
        }
    }

    fn overhearing_of(frames: Vec<Heard>, nics: usize) -> Overhearing {
        let mut kept = Kept::default();
        frames.into_iter().for_each(|h| kept.push(h));
        Overhearing {
            shared: Arc::new(Shared {
                kept: Mutex::new(kept),
                stop: AtomicBool::new(false),
            }),
            macs: vec![[0; 6]; nics],
        }
    }

    fn payloads(frames: &[Bytes]) -> Vec<&[u8]> {
        frames.iter().map(|f| &f[GUEST_HDR_LEN + 14..]).collect()
    }

    /// A moment after every frame of a test: none is taken for TCP only.
    fn later() -> Instant {
        Instant::now() + Duration::from_secs(3600)
    }

    /// An overheard IPv4 frame of `protocol` (6: TCP, 17: UDP), `age` old.
    fn ipv4_heard(age: Duration, protocol: u8, tag: u8) -> Heard {
        let mut frame = vec![0u8; GUEST_HDR_LEN + 14];
        frame[GUEST_HDR_LEN + 12..].copy_from_slice(&[0x08, 0x00]);
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, protocol];
        ip.resize(40, tag);
        frame.extend_from_slice(&ip);
        Heard {
            at: Instant::now() - age,
            nic: 0,
            digest: frame_digest(&frame),
            frame: Bytes::from(frame),
        }
    }

    /// Frames caught once the guest's TAPs began to come up may have
    /// reached it through them as well: TCP segments are given anyway (TCP
    /// drops a segment that arrives twice), other frames are not (a
    /// datagram must not arrive twice). Before that, every frame is given.
    /// Before, a promotion took the frames before its TAPs came up and
    /// announced the guest only later: a frame for it arriving in between
    /// (~15 ms in a lab node) was lost while this node's bridge still placed
    /// the guest on its uplink, and the peer answered only at its next
    /// retransmission (a failover drill round of 648 ms instead of ~330).
    #[test]
    fn frames_caught_as_the_taps_came_up_are_given_only_when_tcp() {
        let hearing = overhearing_of(
            vec![
                ipv4_heard(Duration::from_millis(300), 17, 1),
                ipv4_heard(Duration::from_millis(300), 6, 2),
                ipv4_heard(Duration::from_millis(100), 17, 3),
                ipv4_heard(Duration::from_millis(100), 6, 4),
            ],
            1,
        );
        let taps_up = Instant::now() - Duration::from_millis(200);
        let taken = hearing.take(
            Instant::now() - Duration::from_secs(1),
            &HashSet::new(),
            taps_up,
        );
        let tags: Vec<u8> = taken.per_nic[0].iter().map(|f| f[f.len() - 1]).collect();
        assert_eq!(tags, [1, 2, 4], "the late datagram is left out");
        assert_eq!(taken.maybe_delivered, 1);
    }

    #[test]
    fn a_promotion_takes_recent_frames_in_order_without_those_forwarded_or_repeated() {
        let forwarded_frame = heard(Duration::ZERO, 0, b"forwarded");
        let forwarded = HashSet::from([forwarded_frame.digest]);
        let hearing = overhearing_of(
            vec![
                heard(OVERHEARD_WINDOW + Duration::from_millis(500), 0, b"too old"),
                heard(Duration::from_millis(900), 0, b"first"),
                forwarded_frame,
                heard(Duration::from_millis(500), 1, b"other nic"),
                heard(Duration::from_millis(300), 0, b"first"),
                heard(Duration::from_millis(100), 0, b"second"),
            ],
            2,
        );
        let taken = hearing.take(Instant::now() - Duration::from_secs(1), &forwarded, later());
        assert_eq!(payloads(&taken.per_nic[0]), [&b"first"[..], &b"second"[..]]);
        assert_eq!(payloads(&taken.per_nic[1]), [&b"other nic"[..]]);
        assert_eq!(
            (taken.stale, taken.forwarded, taken.copies, taken.total()),
            (0, 1, 1, 3),
            "the frame older than the window was pushed out when a later one came"
        );
    }

    #[test]
    fn frames_from_before_the_primary_was_lost_are_left_out() {
        let hearing = overhearing_of(
            vec![
                heard(Duration::from_millis(900), 0, b"while it lived"),
                heard(Duration::from_millis(100), 0, b"after"),
            ],
            1,
        );
        let taken = hearing.take(
            Instant::now() - Duration::from_millis(500),
            &HashSet::new(),
            later(),
        );
        assert_eq!(payloads(&taken.per_nic[0]), [&b"after"[..]]);
        assert_eq!(taken.stale, 1);
    }

    #[test]
    fn the_bound_pushes_out_the_oldest_frames_and_counts_them() {
        let big = vec![7u8; OVERHEARD_BYTES_MAX / 4];
        let mut frames: Vec<Heard> = (0..5u8)
            .map(|i| {
                let mut payload = big.clone();
                payload[0] = i;
                heard(Duration::ZERO, 0, &payload)
            })
            .collect();
        frames.push(heard(Duration::ZERO, 0, b"last"));
        let taken = overhearing_of(frames, 1).take(
            Instant::now() - Duration::from_secs(1),
            &HashSet::new(),
            later(),
        );
        assert_eq!(taken.dropped, 2, "5 quarters and a bit do not fit: 2 go");
        let firsts: Vec<u8> = taken.per_nic[0]
            .iter()
            .map(|f| f[GUEST_HDR_LEN + 14])
            .collect();
        assert_eq!(firsts, [2, 3, 4, b'l']);
    }

    #[test]
    fn a_checksum_left_to_offload_is_completed() {
        // An IPv4 UDP frame from 10.0.0.1:1000 to 10.0.0.2:2000, "hello",
        // its checksum field holding the pseudo-header's sum, as a sender
        // that offloads it leaves it.
        let mut ethernet = vec![0u8; 14];
        ethernet[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let ip = [
            0x45, 0, 0, 33, 0, 0, 0, 0, 64, 17, 0, 0, 10, 0, 0, 1, 10, 0, 0, 2,
        ];
        ethernet.extend_from_slice(&ip);
        let udp_len = 8 + 5u16;
        ethernet.extend_from_slice(&1000u16.to_be_bytes());
        ethernet.extend_from_slice(&2000u16.to_be_bytes());
        ethernet.extend_from_slice(&udp_len.to_be_bytes());
        ethernet.extend_from_slice(&[0, 0]);
        ethernet.extend_from_slice(b"hello");
        let pseudo: u32 = 0x0a00 + 0x0001 + 0x0a00 + 0x0002 + 17 + u32::from(udp_len);
        ethernet[40..42].copy_from_slice(&(pseudo as u16).to_be_bytes());
        complete_checksum(&mut ethernet, 34, 6).unwrap();
        assert_eq!(
            u16::from_be_bytes([ethernet[40], ethernet[41]]),
            reference_udp_checksum(&ethernet)
        );
        assert!(
            complete_checksum(&mut ethernet, 34, 60).is_none(),
            "a field past the frame"
        );
    }

    /// A sum whose complement is 0 is written as 0xffff: a UDP checksum of
    /// 0 says "none", and a receiver would take the datagram unchecked.
    #[test]
    fn a_checksum_of_zero_is_written_as_its_other_form() {
        // The covered words sum to 0xffff (the field holding 0): the
        // complement is 0.
        let mut region = vec![0x12, 0x34, 0xed, 0xcb, 0, 0];
        complete_checksum(&mut region, 0, 4).unwrap();
        assert_eq!(region[4..], [0xff, 0xff]);
        // Any other sum is its complement.
        let mut region = vec![0x12, 0x34, 0, 0];
        complete_checksum(&mut region, 0, 2).unwrap();
        assert_eq!(region[2..], (!0x1234u16).to_be_bytes());
    }

    /// RFC 768's checksum, summed from scratch over the pseudo-header and
    /// the datagram (its checksum field taken as zero).
    fn reference_udp_checksum(ethernet: &[u8]) -> u16 {
        let ip = &ethernet[14..34];
        let udp = &ethernet[34..];
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&ip[12..20]);
        bytes.extend_from_slice(&[0, 17]);
        bytes.extend_from_slice(&(udp.len() as u16).to_be_bytes());
        bytes.extend_from_slice(&udp[..6]);
        bytes.extend_from_slice(&[0, 0]);
        bytes.extend_from_slice(&udp[8..]);
        if bytes.len() % 2 == 1 {
            bytes.push(0);
        }
        let mut sum: u64 = bytes
            .chunks(2)
            .map(|w| u64::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    fn ip(args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("runs ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {} (this test needs root)",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A veth pair, deleted when dropped.
    struct Veth(String);

    impl Drop for Veth {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", &self.0]).status();
        }
    }

    /// Real frames through the kernel: a datagram this node sends out of
    /// one end of a veth pair to a neighbour whose MAC is the guest's
    /// arrives on the other end. The copy leaving (outgoing) is not
    /// overheard, the copy arriving is, once, with its UDP checksum
    /// complete (veth leaves it to offload); frames for other MACs are not.
    #[test]
    fn frames_for_the_guest_arriving_on_an_interface_are_overheard() {
        let id = std::process::id() % 100_000;
        let (a, b) = (format!("ovh{id}a"), format!("ovh{id}b"));
        let subnet = 10 + id % 200;
        let (local, guest_ip, other_ip) = (
            format!("10.{subnet}.77.1"),
            format!("10.{subnet}.77.2"),
            format!("10.{subnet}.77.3"),
        );
        ip(&["link", "add", &a, "type", "veth", "peer", "name", &b]);
        let _veth = Veth(a.clone());
        ip(&["addr", "add", &format!("{local}/24"), "dev", &b]);
        ip(&["link", "set", &a, "up"]);
        ip(&["link", "set", &b, "up"]);
        let guest_mac = [0x52, 0x54, 0x00, 0x0f, 0x70, 0x01];
        ip(&[
            "neigh",
            "replace",
            &guest_ip,
            "lladdr",
            "52:54:00:0f:70:01",
            "dev",
            &b,
        ]);
        ip(&[
            "neigh",
            "replace",
            &other_ip,
            "lladdr",
            "52:54:00:0f:70:09",
            "dev",
            &b,
        ]);
        let hearing = Overhearing::start(&[[0x52, 0x54, 0, 0, 0, 0x99], guest_mac]).unwrap();
        let socket = UdpSocket::bind((local.as_str(), 0)).unwrap();
        socket
            .send_to(b"for someone else", (other_ip.as_str(), 9))
            .unwrap();
        socket
            .send_to(b"for the guest", (guest_ip.as_str(), 9))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while hearing.shared.kept.lock().unwrap().frames.is_empty() {
            assert!(Instant::now() < deadline, "nothing overheard in 10 s");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Anything else the kernel would deliver has been read by now: the
        // frame for the guest was sent after the other one.
        std::thread::sleep(Duration::from_millis(200));
        let taken = hearing.take(
            Instant::now() - Duration::from_secs(10),
            &HashSet::new(),
            later(),
        );
        assert!(taken.per_nic[0].is_empty());
        assert_eq!(taken.per_nic[1].len(), 1, "one copy, the arriving one");
        assert_eq!(taken.copies, 0, "the outgoing copy was filtered out");
        let frame = &taken.per_nic[1][0];
        assert_eq!(
            &frame[..GUEST_HDR_LEN],
            &[0; GUEST_HDR_LEN],
            "no offload asked of the guest"
        );
        let ethernet = &frame[GUEST_HDR_LEN..];
        assert_eq!(ethernet[..6], guest_mac);
        assert!(ethernet.ends_with(b"for the guest"));
        assert_eq!(
            u16::from_be_bytes([ethernet[40], ethernet[41]]),
            reference_udp_checksum(ethernet)
        );
    }
}
