//! The guest's network input, VM-wide: every NIC's receive log driven
//! together. The FT engine numbers what the guest received at each
//! checkpoint ([`Input::delivered`]), forwards copies of the frames as they
//! are delivered ([`Input::start`], [`Input::take`]), and a promoted
//! replica gets the frames its checkpoint had not yet received
//! ([`Input::replay`]) instead of waiting for its peers to send them again.

use std::sync::Arc;

use crate::devices::virtio::net::queues::MAX_FRAME_LEN;
use crate::devices::virtio::net::rx_log::RxLog;
use crate::devices::virtio::net::tap::Tap;

/// Most frames [`Input::take_waiting`] takes from one TAP.
const MAX_WAITING_FRAMES: usize = 1024;

/// A frame the guest received on NIC `nic` (virtio header included), with
/// its sequence number on that NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboundFrame {
    pub nic: u32,
    pub seq: u64,
    pub frame: Vec<u8>,
}

/// The receive logs of every NIC of a VM.
pub struct Input {
    logs: Vec<Arc<RxLog>>,
    /// Each NIC's TAP, in device order.
    taps: Vec<Arc<Tap>>,
}

impl Input {
    pub(crate) fn new(logs: Vec<Arc<RxLog>>, taps: Vec<Arc<Tap>>) -> Input {
        Input { logs, taps }
    }

    /// Only while the VM is paused (its receive threads read no TAP then):
    /// the frames waiting at each NIC's TAP, not delivered to the guest,
    /// numbered after the delivered ones, NIC by NIC in arrival order (at
    /// most 1024 per NIC). They must reach a copy of the guest: this one
    /// ([`Input::replay`]) or the replica that takes it over.
    pub fn take_waiting(&self) -> Vec<InboundFrame> {
        let mut buf = vec![0u8; MAX_FRAME_LEN];
        let mut out = Vec::new();
        for (nic, (log, tap)) in self.logs.iter().zip(&self.taps).enumerate() {
            let mut seq = log.delivered();
            let mut taken = 0;
            while taken < MAX_WAITING_FRAMES {
                match tap.read_frame(&mut buf) {
                    Ok(len) => {
                        out.push(InboundFrame {
                            nic: nic as u32,
                            seq,
                            frame: buf[..len].to_vec(),
                        });
                        seq += 1;
                        taken += 1;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    // Empty (WouldBlock), or the TAP went away.
                    Err(_) => break,
                }
            }
        }
        out
    }

    /// Copies every frame delivered from now on (anything copied before is
    /// dropped).
    pub fn start(&self) {
        self.logs.iter().for_each(|l| l.start());
    }

    /// Stops copying and drops what was copied.
    pub fn stop(&self) {
        self.logs.iter().for_each(|l| l.stop());
    }

    /// Per NIC, the frames delivered into guest memory so far (exact while
    /// the guest is paused): a checkpoint taken now holds frames numbered
    /// below these.
    pub fn delivered(&self) -> Vec<u64> {
        self.logs.iter().map(|l| l.delivered()).collect()
    }

    /// Copies dropped because they were not taken in time, on every NIC.
    pub fn dropped(&self) -> u64 {
        self.logs.iter().map(|l| l.dropped()).sum()
    }

    /// The copies made since the last take, NIC by NIC, each in delivery
    /// order.
    pub fn take(&self) -> Vec<InboundFrame> {
        self.logs
            .iter()
            .enumerate()
            .flat_map(|(nic, log)| {
                log.take().into_iter().map(move |f| InboundFrame {
                    nic: nic as u32,
                    seq: f.seq,
                    frame: f.frame,
                })
            })
            .collect()
    }

    /// Calls `hook` whenever a copy starts waiting to be taken.
    pub fn on_recorded(&self, hook: Arc<dyn Fn() + Send + Sync>) {
        for log in &self.logs {
            let hook = Arc::clone(&hook);
            log.on_recorded(Box::new(move || hook()));
        }
    }

    /// Delivers `frames` to the guest on NIC `nic` before anything from
    /// its TAP; returns how many were queued (none for a NIC the VM does
    /// not have).
    pub fn replay(&self, nic: usize, frames: impl IntoIterator<Item = Vec<u8>>) -> usize {
        self.logs.get(nic).map_or(0, |l| l.replay(frames))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::net::tap::VNET_HDR_LEN;

    /// Sends `frame` out of interface `ifname` (the kernel's side of a
    /// TAP: it arrives on the TAP's file descriptor).
    fn send_from_host(ifname: &str, frame: &[u8]) {
        let name = std::ffi::CString::new(ifname).unwrap();
        // SAFETY: if_nametoindex reads the NUL-terminated name it is given.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {ifname}");
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket takes plain integers; the descriptor is closed below.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: an all-zero sockaddr_ll is valid; the fields used are set.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = protocol;
        to.sll_ifindex = index as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the buffer and the address are valid for the lengths
        // given, for the duration of the call.
        let sent = unsafe {
            libc::sendto(
                fd,
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        let error = std::io::Error::last_os_error();
        // SAFETY: `fd` is the socket made above, closed once.
        unsafe { libc::close(fd) };
        assert_eq!(sent, frame.len() as isize, "{error}");
    }

    /// Frames waiting at a TAP while the VM is paused are taken, numbered
    /// after those delivered, in arrival order.
    #[test]
    fn frames_waiting_at_the_tap_are_taken_numbered_after_the_delivered_ones() {
        let name = "fttakewt0";
        let tap = Arc::new(Tap::open(name).expect("TAP (needs CAP_NET_ADMIN)"));
        let log = Arc::new(RxLog::new().unwrap());
        // Two frames were delivered to the guest before.
        log.delivered_frame(b"zero");
        log.delivered_frame(b"one");
        let input = Input::new(vec![Arc::clone(&log)], vec![Arc::clone(&tap)]);
        assert!(input.take_waiting().is_empty(), "nothing waits yet");
        for (what, args) in [
            (
                "no IPv6 chatter",
                vec!["-w", "net.ipv6.conf.fttakewt0.disable_ipv6=1"],
            ),
            ("up", vec![]),
        ] {
            let ok = if args.is_empty() {
                std::process::Command::new("ip")
                    .args(["link", "set", name, "up"])
                    .status()
            } else {
                std::process::Command::new("sysctl").args(&args).status()
            };
            assert!(ok.is_ok_and(|s| s.success()), "{what}");
        }
        let frame = |n: u8| {
            let mut f = vec![0x02, 0, 0, 0, 0, 9, 0x02, 0, 0, 0, 0, 8, 0x88, 0xb5];
            f.resize(60, n);
            f
        };
        for n in 1..=3 {
            send_from_host(name, &frame(n));
        }
        let taken = input.take_waiting();
        let ours: Vec<_> = taken
            .iter()
            .filter(|f| f.frame.get(VNET_HDR_LEN + 12..VNET_HDR_LEN + 14) == Some(&[0x88, 0xb5]))
            .collect();
        assert_eq!(ours.len(), 3, "{taken:?}");
        for (n, f) in ours.iter().enumerate() {
            assert_eq!(
                f.frame[VNET_HDR_LEN..],
                frame(n as u8 + 1)[..],
                "in arrival order"
            );
        }
        let seqs: Vec<u64> = taken.iter().map(|f| f.seq).collect();
        let expected: Vec<u64> = (2..2 + taken.len() as u64).collect();
        assert_eq!(seqs, expected, "numbered on from the delivered count");
        assert!(taken.iter().all(|f| f.nic == 0));
        assert!(input.take_waiting().is_empty(), "taken once");
        // Taken frames are not delivered: the count is unchanged.
        assert_eq!(log.delivered(), 2);
    }
}
