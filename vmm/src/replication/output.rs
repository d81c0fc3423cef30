//! The guest's network output, VM-wide: the transmit gates of every NIC
//! driven together (output commit holds what the guest sends in numbered
//! batches, one per epoch, and releases a batch when its epoch commits),
//! the guest's IPv4 addresses learned from what it sends, and their
//! announcement by gratuitous ARP after a takeover.

use std::sync::{Arc, Mutex};

use crate::devices::virtio::net::tap::VNET_HDR_LEN;
use crate::devices::virtio::net::tx_gate::TxGate;

/// How many guest addresses are remembered.
const MAX_ADDRESSES: usize = 8;

/// The NICs' output of one VM.
pub struct Output {
    /// Each NIC's gate and MAC, in device order.
    nics: Vec<(Arc<TxGate>, [u8; 6])>,
    addresses: Mutex<Vec<[u8; 4]>>,
}

/// The IPv4 source address of an Ethernet frame (IPv4 or ARP), if any.
fn ipv4_source(ethernet: &[u8]) -> Option<[u8; 4]> {
    let ethertype = u16::from_be_bytes(ethernet.get(12..14)?.try_into().ok()?);
    let at = match ethertype {
        0x0800 => 14 + 12,
        0x0806 => 14 + 14,
        _ => return None,
    };
    let ip: [u8; 4] = ethernet.get(at..at + 4)?.try_into().ok()?;
    (ip != [0; 4]).then_some(ip)
}

/// Whether an Ethernet frame carries a TCP segment: over IPv4, or over
/// IPv6 after any hop-by-hop, routing, fragment or destination options
/// headers; untagged or behind up to two VLAN tags (802.1Q, 802.1ad).
pub fn is_tcp(ethernet: &[u8]) -> bool {
    const TCP: u8 = 6;
    let mut at = 12;
    for _ in 0..3 {
        match ethernet.get(at..at + 2) {
            Some([0x81, 0x00] | [0x88, 0xa8]) => at += 4,
            Some([0x08, 0x00]) => return ethernet.get(at + 2 + 9) == Some(&TCP),
            Some([0x86, 0xdd]) => return ipv6_carries(ethernet.get(at + 2..), TCP),
            _ => return false,
        }
    }
    false
}

/// Whether an IPv6 packet's payload is `protocol`, past its extension
/// headers (at most 8 of them are followed).
fn ipv6_carries(packet: Option<&[u8]>, protocol: u8) -> bool {
    const HOP_BY_HOP: u8 = 0;
    const ROUTING: u8 = 43;
    const FRAGMENT: u8 = 44;
    const DESTINATION: u8 = 60;
    let Some(packet) = packet else { return false };
    let Some(&first) = packet.get(6) else {
        return false;
    };
    let (mut next, mut at) = (first, 40);
    for _ in 0..8 {
        if next == protocol {
            return true;
        }
        let len = match next {
            HOP_BY_HOP | ROUTING | DESTINATION => match packet.get(at + 1) {
                Some(&units) => 8 + usize::from(units) * 8,
                None => return false,
            },
            FRAGMENT => 8,
            _ => return false,
        };
        match packet.get(at) {
            Some(&header) => next = header,
            None => return false,
        }
        at += len;
    }
    false
}

fn remember(addresses: &mut Vec<[u8; 4]>, ip: [u8; 4]) {
    if !addresses.contains(&ip) && addresses.len() < MAX_ADDRESSES {
        addresses.push(ip);
    }
}

impl Output {
    pub(crate) fn new(nics: Vec<(Arc<TxGate>, [u8; 6])>) -> Output {
        Output {
            nics,
            addresses: Mutex::default(),
        }
    }

    fn gates(&self) -> impl Iterator<Item = &TxGate> {
        self.nics.iter().map(|(g, _)| g.as_ref())
    }

    /// How many NICs the VM has.
    pub fn nics(&self) -> usize {
        self.nics.len()
    }

    /// From now on transmitted frames are held until released.
    pub fn hold(&self) {
        self.gates().for_each(TxGate::hold);
    }

    /// The frames held since the last seal become batch `batch` (call it
    /// while the guest is paused, so the cut is exact); the guest's source
    /// addresses are learned from them. Returns how many frames.
    pub fn seal(&self, batch: u64) -> usize {
        self.seal_copying(batch, 0).0
    }

    /// [`Output::seal`], also copying the batch's TCP segments (per NIC,
    /// in order, virtio header included) while the copy stays within
    /// `copy_max` bytes: a segment that would pass it, and every later
    /// one, is not copied. (Only TCP: a peer drops a segment it gets
    /// twice; a datagram might be acted on twice.)
    pub fn seal_copying(&self, batch: u64, copy_max: usize) -> (usize, Vec<Vec<Vec<u8>>>) {
        let mut addresses = self.addresses.lock().expect("addresses lock");
        let mut copied = 0;
        let mut full = false;
        let mut copies = Vec::new();
        let mut sealed = 0;
        for gate in self.gates() {
            let mut nic = Vec::new();
            sealed += gate.seal(batch, |frame| {
                if let Some(ip) = frame.get(VNET_HDR_LEN..).and_then(ipv4_source) {
                    remember(&mut addresses, ip);
                }
                if !frame.get(VNET_HDR_LEN..).is_some_and(is_tcp) {
                    return;
                }
                full = full || copied + frame.len() > copy_max;
                if !full {
                    copied += frame.len();
                    nic.push(frame.to_vec());
                }
            });
            copies.push(nic);
        }
        (sealed, copies)
    }

    /// Whether frames wait for the next seal.
    pub fn has_unsealed(&self) -> bool {
        self.gates().any(|g| g.unsealed() > 0)
    }

    /// Sends every sealed batch numbered `batch` or lower; returns how many
    /// frames went out.
    pub fn release_through(&self, batch: u64) -> usize {
        self.gates().map(|g| g.release_through(batch)).sum()
    }

    /// Takes every sealed batch numbered `batch` or lower out unsent (the
    /// node that takes the VM over sends them): per NIC, in order, each
    /// frame with its virtio header.
    pub fn take_through(&self, batch: u64) -> Vec<Vec<Vec<u8>>> {
        self.gates().map(|g| g.take_through(batch)).collect()
    }

    /// Sends frames another node's copy of this VM held (taken with
    /// [`Output::take_through`] there) on NIC `nic`, at once; returns how
    /// many (none for a NIC this VM does not have).
    pub fn send_handed_over(&self, nic: usize, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        let Some((gate, _)) = self.nics.get(nic) else {
            return 0;
        };
        frames.into_iter().map(|f| gate.send_now(&f)).count()
    }

    /// Stops holding: everything held goes out in order, later frames at
    /// once (no replica remains to wait for). Returns how many were held.
    pub fn open(&self) -> usize {
        self.gates().map(TxGate::open).sum()
    }

    /// Every held frame, sealed or not, joins one batch numbered `batch`,
    /// in order (a session's output after the session ended, released
    /// together once it is safe). Returns how many frames.
    pub fn merge_held(&self, batch: u64) -> usize {
        self.gates().map(|g| g.merge_held(batch)).sum()
    }

    /// Drops every held frame (a copy that was superseded: its output
    /// must never leave). Returns how many.
    pub fn discard_held(&self) -> usize {
        self.gates().map(TxGate::discard).sum()
    }

    /// Frames held right now, sealed or not.
    pub fn holding_frames(&self) -> u64 {
        self.gates().map(|g| g.counters().holding_frames).sum()
    }

    /// Calls `hook` whenever held output starts waiting for a checkpoint
    /// (the owner may want to checkpoint sooner).
    pub fn on_held_output(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        for gate in self.gates() {
            let hook = Arc::clone(&hook);
            gate.on_held_output(Box::new(move || hook()));
        }
    }

    /// The IPv4 addresses the guest has sent from in sealed output.
    pub fn guest_ipv4(&self) -> Vec<[u8; 4]> {
        self.addresses.lock().expect("addresses lock").clone()
    }

    /// Announces `addresses` (and remembers them as the guest's) on every
    /// NIC with a gratuitous ARP from its MAC; returns how many could not
    /// be sent.
    pub fn announce(&self, addresses: &[[u8; 4]]) -> usize {
        self.announcer(addresses).announce()
    }

    /// What announces `addresses` (remembered as the guest's) on every
    /// NIC, apart from the VM: for repeats from another thread.
    pub fn announcer(&self, addresses: &[[u8; 4]]) -> Announcer {
        let mut known = self.addresses.lock().expect("addresses lock");
        for ip in addresses {
            remember(&mut known, *ip);
        }
        Announcer {
            nics: self.nics.clone(),
            addresses: addresses.to_vec(),
        }
    }
}

/// Gratuitous ARPs for a set of the guest's addresses, on every NIC.
pub struct Announcer {
    nics: Vec<(Arc<TxGate>, [u8; 6])>,
    addresses: Vec<[u8; 4]>,
}

impl Announcer {
    /// Sends one round; returns how many frames could not be sent.
    pub fn announce(&self) -> usize {
        let mut failed = 0;
        for (gate, mac) in &self.nics {
            for ip in &self.addresses {
                if gate.inject(&gratuitous_arp(*mac, *ip)).is_err() {
                    failed += 1;
                }
            }
        }
        failed
    }
}

/// A gratuitous ARP request announcing that `ip` is at `mac`.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x08, 0x06]); // ARP
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 1]); // Ethernet/IPv4, request
    f.extend_from_slice(&mac);
    f.extend_from_slice(&ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&ip);
    f.resize(60, 0);
    f
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::tap::Tap;

    /// An Ethernet frame of `ethertype` behind `tags`, then `payload`.
    fn ethernet(tags: &[[u8; 2]], ethertype: [u8; 2], payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        for tpid in tags {
            f.extend_from_slice(tpid);
            f.extend_from_slice(&[0, 7]);
        }
        f.extend_from_slice(&ethertype);
        f.extend_from_slice(payload);
        f
    }

    fn ipv4(protocol: u8) -> Vec<u8> {
        let mut p = vec![0x45, 0, 0, 40, 0, 0, 0, 0, 64, protocol];
        p.resize(40, 0);
        p
    }

    /// An IPv6 header whose next header is `first`, then `extensions`.
    fn ipv6(first: u8, extensions: &[u8]) -> Vec<u8> {
        let mut p = vec![0x60, 0, 0, 0, 0, 20, first, 64];
        p.resize(40, 0);
        p.extend_from_slice(extensions);
        p.resize(p.len() + 20, 0);
        p
    }

    #[test]
    fn tcp_is_found_behind_vlan_tags_and_ipv6_extension_headers() {
        const V4: [u8; 2] = [0x08, 0x00];
        const V6: [u8; 2] = [0x86, 0xdd];
        const Q: [u8; 2] = [0x81, 0x00];
        const AD: [u8; 2] = [0x88, 0xa8];
        assert!(is_tcp(&ethernet(&[], V4, &ipv4(6))));
        assert!(!is_tcp(&ethernet(&[], V4, &ipv4(17))));
        assert!(is_tcp(&ethernet(&[Q], V4, &ipv4(6))));
        assert!(is_tcp(&ethernet(&[AD, Q], V4, &ipv4(6))));
        assert!(!is_tcp(&ethernet(&[AD, Q, Q], V4, &ipv4(6))), "three tags");
        assert!(!is_tcp(&ethernet(&[Q], V4, &ipv4(17))));
        assert!(is_tcp(&ethernet(&[], V6, &ipv6(6, &[]))));
        assert!(!is_tcp(&ethernet(&[], V6, &ipv6(17, &[]))));
        // Hop-by-hop (8 bytes) then a 16-byte destination options header
        // then TCP; and a fragment header then TCP.
        let mut ext = vec![60, 0, 0, 0, 0, 0, 0, 0];
        ext.extend_from_slice(&[6, 1]);
        ext.resize(24, 0);
        assert!(is_tcp(&ethernet(&[Q], V6, &ipv6(0, &ext))));
        ext[8] = 17;
        assert!(!is_tcp(&ethernet(&[Q], V6, &ipv6(0, &ext))));
        assert!(is_tcp(&ethernet(
            &[],
            V6,
            &ipv6(44, &[6, 0, 0, 0, 0, 0, 0, 0])
        )));
        // Truncated frames and other ethertypes are not TCP.
        assert!(!is_tcp(&ethernet(&[], V6, &[0x60, 0, 0, 0, 0, 20])));
        assert!(!is_tcp(&ethernet(&[], [0x08, 0x06], &ipv4(6))));
        assert!(!is_tcp(&[0u8; 13]));
    }

    #[test]
    fn addresses_are_learned_from_ipv4_and_arp() {
        let arp = gratuitous_arp([0x52, 0x54, 0, 1, 2, 3], [10, 77, 0, 100]);
        assert_eq!(ipv4_source(&arp), Some([10, 77, 0, 100]));
        let mut ip = vec![0u8; 34];
        ip[12..14].copy_from_slice(&[0x08, 0x00]);
        ip[26..30].copy_from_slice(&[192, 168, 1, 7]);
        assert_eq!(ipv4_source(&ip), Some([192, 168, 1, 7]));
        ip[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(ipv4_source(&ip), None);
        assert_eq!(ipv4_source(&ip[..10]), None);
    }

    #[test]
    fn sealed_output_teaches_the_guest_addresses() {
        let tap = Arc::new(Tap::open("ftoutt0").expect("TAP (needs CAP_NET_ADMIN)"));
        let output = Output::new(vec![(Arc::new(TxGate::new(tap)), [2, 0, 0, 0, 0, 1])]);
        output.hold();
        let mut frame = vec![0u8; VNET_HDR_LEN];
        frame.extend(gratuitous_arp([2, 0, 0, 0, 0, 1], [10, 0, 0, 9]));
        output.gates().next().unwrap().transmit(&frame);
        assert!(output.has_unsealed());
        assert!(output.guest_ipv4().is_empty(), "learned at the seal");
        assert_eq!(output.seal(1), 1);
        assert_eq!(output.guest_ipv4(), vec![[10, 0, 0, 9]]);
        assert_eq!(output.holding_frames(), 1);
        assert_eq!(output.release_through(1), 1);
        assert_eq!(output.holding_frames(), 0);
    }

    fn ipv4_frame(protocol: u8, len: usize, mark: u8) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN + len];
        let ethernet = &mut frame[VNET_HDR_LEN..];
        ethernet[12..14].copy_from_slice(&[0x08, 0x00]);
        ethernet[14 + 9] = protocol;
        ethernet[len - 1] = mark;
        frame
    }

    #[test]
    fn a_sealed_batch_copies_its_tcp_segments_within_the_bound() {
        let tap = Arc::new(Tap::open("ftoutt1").expect("TAP (needs CAP_NET_ADMIN)"));
        let output = Output::new(vec![(Arc::new(TxGate::new(tap)), [2, 0, 0, 0, 0, 2])]);
        output.hold();
        let gate = output.gates().next().unwrap();
        gate.transmit(&ipv4_frame(6, 100, 1));
        gate.transmit(&ipv4_frame(17, 100, 2));
        gate.transmit(&ipv4_frame(6, 100, 3));
        gate.transmit(&ipv4_frame(6, 100, 4));
        let bound = 2 * (VNET_HDR_LEN + 100);
        let (sealed, copies) = output.seal_copying(1, bound);
        assert_eq!(sealed, 4, "every frame is sealed");
        let marks: Vec<u8> = copies[0].iter().map(|f| *f.last().unwrap()).collect();
        assert_eq!(
            marks,
            [1, 3],
            "TCP only (not the UDP datagram), within the bound"
        );
        assert_eq!(output.release_through(1), 4, "the copy takes nothing out");
    }
}
