//! virtio-net backed by a TAP interface. Features: VIRTIO_F_VERSION_1 and
//! VIRTIO_NET_F_MAC only (no checksum or segmentation offloads, no
//! mergeable receive buffers). Queue 0 receives, queue 1 transmits.
//!
//! Transmit runs in the vCPU thread that notifies queue 1. Receive runs in
//! a thread of its own (`rx_thread`), since frames arrive at any time; the
//! guest notifying queue 0 (buffers added) kicks it. Both work under the
//! Mutex of [`queues::NetQueues`]; `pause()` takes it and sets a flag, so
//! after it returns no frame is written to guest memory until `resume()`
//! (a vCPU pause stops transmit).

pub mod queues;
pub mod rx_log;
pub mod rx_thread;
pub mod state;
pub mod tap;
pub mod tx_gate;

use std::str::FromStr;
use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MAC;
use virtio_queue::QueueState;

use self::queues::{NetBackend, NetQueues};
use self::rx_log::RxLog;
use self::rx_thread::RxThread;
use self::state::{NetState, NET_STATE_VERSION};
use self::tap::{AttachedTaps, Tap, TapError};
use self::tx_gate::TxGate;
use super::{ActivateError, Activation, VirtioDevice, VIRTIO_F_VERSION_1};

pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 2] = [QUEUE_SIZE, QUEUE_SIZE];
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("net state version {found} is not supported (expected {NET_STATE_VERSION})")]
    StateVersion { found: u32 },
    #[error("creating the receive log's eventfd failed: {0}")]
    RxLog(#[source] std::io::Error),
}

/// A NIC of the VM: `tap=NAME,mac=52:54:00:12:34:56` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub tap: String,
    pub mac: [u8; 6],
}

fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("MAC {s:?} is not six colon-separated bytes"));
    }
    let mut mac = [0u8; 6];
    for (byte, part) in mac.iter_mut().zip(parts) {
        if part.len() != 2 {
            return Err(format!("MAC {s:?}: {part:?} is not two hex digits"));
        }
        *byte = u8::from_str_radix(part, 16)
            .map_err(|_| format!("MAC {s:?}: {part:?} is not two hex digits"))?;
    }
    if mac[0] & 1 != 0 {
        return Err(format!("MAC {s:?} is a multicast address"));
    }
    Ok(mac)
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tap, mut mac) = (None, None);
        for item in s.split(',') {
            match item.split_once('=') {
                Some(("tap", name)) if !name.is_empty() => tap = Some(name.to_string()),
                Some(("mac", m)) => mac = Some(parse_mac(m)?),
                _ => {
                    return Err(format!(
                        "unknown net option {item:?} (expected tap=NAME,mac=MAC)"
                    ))
                }
            }
        }
        Ok(NetConfig {
            tap: tap.ok_or("missing tap=NAME")?,
            mac: mac.ok_or("missing mac=MAC")?,
        })
    }
}

/// The device while the driver runs it.
struct ActiveNet {
    queues: Arc<Mutex<NetQueues>>,
    rx_thread: RxThread,
}

pub struct Net {
    mac: [u8; 6],
    tap: Arc<Tap>,
    gate: Arc<TxGate>,
    rx_log: Arc<RxLog>,
    paused: bool,
    active: Option<ActiveNet>,
}

impl Net {
    /// Attaches to the TAP (it must exist or be creatable by this process).
    pub fn open(config: &NetConfig) -> Result<Net, NetError> {
        Net::on_tap(config, Tap::open(&config.tap)?)
    }

    fn on_tap(config: &NetConfig, tap: Tap) -> Result<Net, NetError> {
        let tap = Arc::new(tap);
        Ok(Net {
            mac: config.mac,
            gate: Arc::new(TxGate::new(Arc::clone(&tap))),
            rx_log: Arc::new(RxLog::new().map_err(NetError::RxLog)?),
            tap,
            paused: false,
            active: None,
        })
    }

    /// The device restored from `state` on the TAP of `config` (the MAC the
    /// guest knows comes from the state): the one in `attached` if it is
    /// there, else attached now.
    pub fn from_state(
        config: &NetConfig,
        state: &NetState,
        attached: &mut AttachedTaps,
    ) -> Result<Net, NetError> {
        if state.version != NET_STATE_VERSION {
            return Err(NetError::StateVersion {
                found: state.version,
            });
        }
        let config = NetConfig {
            tap: config.tap.clone(),
            mac: state.mac,
        };
        match attached.take(&config.tap) {
            Some(tap) => Net::on_tap(&config, tap),
            None => Net::open(&config),
        }
    }

    pub fn state(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            mac: self.mac,
        }
    }

    /// The gate transmitted frames pass through.
    pub fn tx_gate(&self) -> Arc<TxGate> {
        Arc::clone(&self.gate)
    }

    /// The log of the frames delivered to the guest (and of those to
    /// replay).
    pub fn rx_log(&self) -> Arc<RxLog> {
        Arc::clone(&self.rx_log)
    }
}

impl VirtioDevice for Net {
    fn device_state(&self) -> super::DeviceState {
        super::DeviceState::Net(self.state())
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | 1 << VIRTIO_NET_F_MAC
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    /// The configuration space: the MAC (nothing else is offered).
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let start = offset as usize;
        match self.mac.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only for a virtio 1.x driver.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        if got != QUEUE_SIZES.len() {
            return Err(ActivateError::QueueCount {
                expected: QUEUE_SIZES.len(),
                got,
            });
        }
        let mut queues = activation.queues.into_iter();
        let (rx, tx) = (
            queues.next().expect("two queues"),
            queues.next().expect("two queues"),
        );
        let queues = Arc::new(Mutex::new(NetQueues::new(
            activation.mem,
            rx,
            tx,
            activation.interrupt,
            NetBackend {
                tap: Arc::clone(&self.tap),
                gate: Arc::clone(&self.gate),
                rx_log: Arc::clone(&self.rx_log),
            },
            self.paused,
        )));
        let rx_thread = RxThread::spawn(Arc::clone(&queues), self.tap.name())?;
        self.active = Some(ActiveNet { queues, rx_thread });
        Ok(())
    }

    fn queue_notify(&mut self, queue_index: u16) {
        let Some(active) = &self.active else {
            return;
        };
        match queue_index {
            RX_QUEUE => active.rx_thread.kick(),
            TX_QUEUE => active.queues.lock().expect("net queues lock").transmit(),
            _ => {}
        }
    }

    fn reset(&mut self) {
        // Dropping the receive thread stops and joins it.
        self.active = None;
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|a| {
            let q = a.queues.lock().expect("net queues lock");
            vec![q.rx.state(), q.tx.state()]
        })
    }

    fn pause(&mut self) {
        self.paused = true;
        if let Some(active) = &self.active {
            // Receive passes run under this lock: once it is ours, none is
            // in progress, and none writes guest memory until resume.
            active.queues.lock().expect("net queues lock").paused = true;
        }
    }

    fn resume(&mut self) {
        self.paused = false;
        if let Some(active) = &self.active {
            let missed = {
                let mut queues = active.queues.lock().expect("net queues lock");
                queues.paused = false;
                std::mem::take(&mut queues.stopped_by_pause)
            };
            if missed {
                active.rx_thread.kick();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::{Duration, Instant};

    use crate::memory::GuestMemoryMmap;

    use super::rx_log::RxLog;
    use super::tap::VNET_HDR_LEN;
    use crate::devices::virtio::mmio::MmioTransport;
    use crate::devices::virtio::test_queue::TestQueue;

    /// A net device on a new TAP named `tap`, brought up by a driver: its
    /// transport, the guest memory, its receive queue and its receive log.
    fn active_net(
        tap: &str,
        mac_last: u8,
    ) -> (MmioTransport, GuestMemoryMmap, TestQueue, Arc<RxLog>) {
        use vmm_sys_util::eventfd::EventFd;

        use crate::devices::virtio::mmio::driver::bring_up;
        use crate::devices::virtio::test_queue::test_memory;
        use crate::devices::virtio::VirtioInterrupt;

        let net = Net::open(&NetConfig {
            tap: tap.into(),
            mac: [2, 0, 0, 0, 0, mac_last],
        })
        .expect("TAP (needs CAP_NET_ADMIN)");
        let log = net.rx_log();
        let mem = test_memory();
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let mut transport = MmioTransport::new(Box::new(net), mem.clone(), irq);
        let rx = TestQueue::new(&mem, 0x1_0000, 16);
        let tx = TestQueue::new(&mem, 0x2_0000, 16);
        let features = transport.device().features();
        bring_up(&mut transport, features, &[&rx, &tx]);
        assert!(transport.is_active());
        (transport, mem, rx, log)
    }

    /// Frames to replay reach the guest's receive buffers in order, before
    /// anything else, and are numbered and copied like frames from the TAP.
    #[test]
    fn replayed_frames_are_delivered_numbered_and_recorded() {
        use vm_memory::{Bytes, GuestAddress};

        let (mut transport, mem, rx, log) = active_net("ftrxlogt0", 1);
        log.start();
        let frame = |n: u8| {
            let mut f = vec![0u8; VNET_HDR_LEN + 60];
            f[VNET_HDR_LEN..].fill(n);
            f
        };
        assert_eq!(log.replay([frame(1), frame(2)]), 2);
        // Buffers come after the replay was queued: the guest's
        // notification restarts the receive pass.
        for i in 0..2u64 {
            rx.add_chain(&mem, &[(0x30_0000 + i * 0x1000, 2048, true)]);
        }
        crate::devices::virtio::mmio::driver::notify(&mut transport, u32::from(RX_QUEUE));
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.used_idx(&mem) < 2 {
            assert!(
                Instant::now() < deadline,
                "the replayed frames never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        for i in 0..2u16 {
            let (_, len) = rx.used_elem(&mem, i);
            assert_eq!(len as usize, VNET_HDR_LEN + 60);
            let mut body = [0u8; 60];
            mem.read_slice(
                &mut body,
                GuestAddress(0x30_0000 + u64::from(i) * 0x1000 + VNET_HDR_LEN as u64),
            )
            .unwrap();
            assert!(body.iter().all(|&b| b == i as u8 + 1), "frame {i} in order");
        }
        assert_eq!(log.delivered(), 2);
        let copies = log.take();
        assert_eq!(copies.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(copies[1].frame[VNET_HDR_LEN], 2);
    }

    /// A frame that comes while the device is paused reaches the guest
    /// after the resume: the receive thread, woken meanwhile, found the
    /// device paused, and the resume wakes it again because of that.
    #[test]
    fn frames_that_came_while_paused_are_delivered_after_the_resume() {
        let (mut transport, mem, rx, log) = active_net("ftrxp0", 2);
        for i in 0..4u64 {
            rx.add_chain(&mem, &[(0x30_0000 + i * 0x1000, 2048, true)]);
        }
        crate::devices::virtio::mmio::driver::notify(&mut transport, u32::from(RX_QUEUE));
        transport.pause();
        let frame = vec![7u8; VNET_HDR_LEN + 60];
        assert_eq!(log.replay([frame]), 1);
        // The receive thread took the replay's wakeup and is back in
        // epoll_wait: its pass, which found the device paused, is over.
        let deadline = Instant::now() + Duration::from_secs(5);
        while readable(log.replay_ready()) || !thread_waits_in_epoll("net-rx-ftrxp0") {
            assert!(Instant::now() < deadline, "the receive thread never looked");
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(rx.used_idx(&mem), 0, "delivered while paused");
        transport.resume();
        let deadline = Instant::now() + Duration::from_secs(5);
        while rx.used_idx(&mem) < 1 {
            assert!(
                Instant::now() < deadline,
                "the frame that came while paused never arrived"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// Whether this process's thread named `name` is blocked in an
    /// epoll wait (its `/proc` syscall line: x86-64 numbers).
    fn thread_waits_in_epoll(name: &str) -> bool {
        const EPOLL_WAITS: [&str; 3] = ["232", "281", "441"];
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return false;
        };
        tasks.flatten().any(|task| {
            let read = |file| std::fs::read_to_string(task.path().join(file)).unwrap_or_default();
            read("comm").trim() == name
                && read("syscall")
                    .split_whitespace()
                    .next()
                    .is_some_and(|call| EPOLL_WAITS.contains(&call))
        })
    }

    /// Whether `fd` has something to read now.
    fn readable(fd: &impl std::os::fd::AsRawFd) -> bool {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd, its count, no wait.
        let n = unsafe { libc::poll(&mut poll, 1, 0) };
        n == 1 && poll.revents & libc::POLLIN != 0
    }

    #[test]
    fn net_option_parsing() {
        assert_eq!(
            "tap=tap0,mac=52:54:00:12:34:5a".parse::<NetConfig>(),
            Ok(NetConfig {
                tap: "tap0".into(),
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x5a]
            })
        );
        assert!("tap=tap0".parse::<NetConfig>().is_err());
        assert!("mac=52:54:00:12:34:56".parse::<NetConfig>().is_err());
        assert!("tap=tap0,mac=52:54:00:12:34".parse::<NetConfig>().is_err());
        assert!("tap=tap0,mac=53:54:00:12:34:56"
            .parse::<NetConfig>()
            .is_err());
        assert!("tap=tap0,mac=52:54:00:12:34:5g"
            .parse::<NetConfig>()
            .is_err());
        assert!("tap=tap0,mac=52:54:00:12:34:56,x=1"
            .parse::<NetConfig>()
            .is_err());
    }
}
