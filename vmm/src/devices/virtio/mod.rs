//! virtio devices on the virtio-mmio transport: the device-independent
//! interface a device implements ([`VirtioDevice`]), the interrupt it raises
//! ([`VirtioInterrupt`]), the transport ([`mmio::MmioTransport`]) and the
//! devices themselves (block, net).
//!
//! Queue notifications are handled synchronously in the vCPU thread that
//! writes QueueNotify (a consistent cut for checkpoints: no device work runs
//! while the vCPUs are paused), except network receive, whose frames arrive
//! from the host at any time (see `net::rx_thread`).

pub mod block;
pub mod mmio;
pub mod net;
pub mod state;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use virtio_queue::{Queue, QueueState};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::{Bus, BusError};
use crate::layout::{VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::memory::GuestMemoryMmap;

use self::block::state::BlockState;
use self::block::write_log::WriteLog;
use self::block::{Block, BlockError, DiskConfig};
use self::mmio::{MmioError, MmioTransport};
use self::net::rx_log::RxLog;
use self::net::state::NetState;
use self::net::tx_gate::TxGate;
use self::net::{Net, NetConfig, NetError};
use self::state::MmioTransportState;

/// Feature bit: the device complies with virtio 1.0 or later (no legacy).
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;

/// InterruptStatus bit: the device used a buffer in one of its queues.
pub const INTERRUPT_USED_BUFFER: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device's configuration changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// The highest GSI a virtio device may use (the in-kernel IOAPIC has 24 pins).
pub const VIRTIO_IRQ_LAST: u32 = 23;

/// Raises a device's interrupt: sets bits in the transport's InterruptStatus
/// register and signals the eventfd that KVM injects as the device's GSI.
pub struct VirtioInterrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl VirtioInterrupt {
    pub fn new(irqfd: EventFd) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irqfd,
        }
    }

    /// Sets `bits` in InterruptStatus and raises the interrupt.
    pub fn trigger(&self, bits: u32) -> std::io::Result<()> {
        self.status.fetch_or(bits, Ordering::SeqCst);
        self.irqfd.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: the driver handled `bits`.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub(crate) fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// A restored InterruptStatus the driver had not acknowledged: its
    /// interrupt is raised again. KVM injects an irqfd's interrupt into
    /// the IOAPIC from a worker of its own, so one raised just before a
    /// capture may be in no interrupt controller state the capture saw;
    /// the restored guest would then never look at the buffers it was
    /// for (a disk request that never completes). An extra interrupt for
    /// a status already seen is one the driver finds nothing for.
    pub(crate) fn raise_pending(&self) -> std::io::Result<()> {
        if self.status() != 0 {
            self.irqfd.write(1)?;
        }
        Ok(())
    }

    /// The eventfd behind the interrupt (tests read it).
    #[cfg(test)]
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }
}

/// What a device gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    /// The queues, configured by the driver, in the device's queue order.
    pub queues: Vec<Queue>,
    pub interrupt: Arc<VirtioInterrupt>,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the device expects {expected} queues, the transport has {got}")]
    QueueCount { expected: usize, got: usize },
    #[error("queue {index} is not ready or not valid in guest memory")]
    QueueNotReady { index: usize },
    #[error("creating the eventfd for {what} failed: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("starting the receive thread failed: {0}")]
    SpawnThread(#[source] std::io::Error),
    #[error("setting up epoll for the receive thread failed: {0}")]
    Epoll(#[source] std::io::Error),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The device's own saved state (beyond its transport's).
    fn device_state(&self) -> DeviceState;
    /// The virtio device ID (1: net, 2: block).
    fn device_type(&self) -> u32;
    /// The features the device offers (VIRTIO_F_VERSION_1 included).
    fn features(&self) -> u64;
    /// The maximum size of each of the device's queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// The driver set DRIVER_OK: the device takes its queues and starts.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// The driver wrote `queue_index` to QueueNotify (called in the vCPU thread).
    fn queue_notify(&mut self, queue_index: u16);
    /// Device reset: the device stops and drops its queues.
    fn reset(&mut self);
    /// The queues' current state while the device is active.
    fn queue_states(&self) -> Option<Vec<QueueState>>;
    /// Stops all device activity that the vCPUs do not drive (network
    /// receive) at a consistent point; no guest memory is written until
    /// `resume`.
    fn pause(&mut self) {}
    fn resume(&mut self) {}
}

#[derive(Debug, thiserror::Error)]
pub enum VirtioError {
    #[error("too many virtio devices: {count}, GSIs {VIRTIO_IRQ_BASE}..={VIRTIO_IRQ_LAST} allow {}", VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1)]
    TooManyDevices { count: usize },
    #[error("creating the interrupt eventfd of virtio device {index} failed: {source}")]
    IrqEventFd {
        index: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("KVM_IRQFD for virtio device {index} (GSI {gsi}) failed: {source}")]
    RegisterIrqfd {
        index: usize,
        gsi: u32,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Block(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error("restoring the transport of virtio device {index}: {source}")]
    RestoreTransport {
        index: usize,
        #[source]
        source: MmioError,
    },
    #[error("saved virtio device {index} is a {config} with the state of another kind of device")]
    StateMismatch { index: usize, config: &'static str },
    #[error("placing virtio device {index} on the MMIO bus failed: {source}")]
    Bus {
        index: usize,
        #[source]
        source: BusError,
    },
}

/// What backs a virtio device on the host.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceConfig {
    Disk(DiskConfig),
    Net(NetConfig),
}

/// A device's own saved state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Net(NetState),
}

/// Everything saved about one virtio device: its backing, the device and
/// the transport (registers, queues, ring positions).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VirtioSlotState {
    pub config: DeviceConfig,
    pub device: DeviceState,
    pub transport: MmioTransportState,
}

/// One virtio-mmio device of the VM.
pub struct VirtioSlot {
    pub base: u64,
    pub gsi: u32,
    pub config: DeviceConfig,
    pub transport: Arc<Mutex<MmioTransport>>,
    /// What replication reaches into: a NIC's transmit gate and receive
    /// log, or a disk's write record.
    pub hook: DeviceHook,
}

/// The part of a device that output commit and disk mirroring drive.
#[derive(Clone)]
pub enum DeviceHook {
    Disk(Arc<WriteLog>),
    Net(Arc<TxGate>, Arc<RxLog>),
}

/// A device ready to be placed: the device and its hook.
fn hooked<D: VirtioDevice + 'static>(
    device: D,
    hook: impl FnOnce(&D) -> DeviceHook,
) -> (Box<dyn VirtioDevice>, DeviceHook) {
    let hook = hook(&device);
    (Box::new(device), hook)
}

/// The VM's virtio devices: disks first, then NICs, one MMIO window and one
/// GSI each.
#[derive(Default)]
pub struct VirtioDevices {
    pub slots: Vec<VirtioSlot>,
}

impl VirtioDevices {
    /// Creates the devices, wires their interrupts and places them on `mmio`.
    pub fn attach(
        vm_fd: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &Bus,
        disks: &[DiskConfig],
        nets: &[NetConfig],
    ) -> Result<VirtioDevices, VirtioError> {
        let configs: Vec<DeviceConfig> = disks
            .iter()
            .cloned()
            .map(DeviceConfig::Disk)
            .chain(nets.iter().cloned().map(DeviceConfig::Net))
            .collect();
        Self::check_count(configs.len())?;
        let mut devices = VirtioDevices::default();
        for (index, config) in configs.into_iter().enumerate() {
            let (device, hook) = match &config {
                DeviceConfig::Disk(disk) => {
                    hooked(Block::open(disk)?, |d| DeviceHook::Disk(d.write_log()))
                }
                DeviceConfig::Net(net) => hooked(Net::open(net)?, |d| {
                    DeviceHook::Net(d.tx_gate(), d.rx_log())
                }),
            };
            devices.add_slot(vm_fd, mmio, index, config, hook, |interrupt| {
                Ok(MmioTransport::new(device, mem.clone(), interrupt))
            })?;
        }
        Ok(devices)
    }

    /// Recreates saved devices (same backing files and TAPs) with their
    /// transports at the saved ring positions.
    pub fn restore(
        vm_fd: &VmFd,
        mem: &GuestMemoryMmap,
        mmio: &Bus,
        saved: &[VirtioSlotState],
        attached_taps: &mut net::tap::AttachedTaps,
        paused: bool,
    ) -> Result<VirtioDevices, VirtioError> {
        Self::check_count(saved.len())?;
        let mut devices = VirtioDevices::default();
        for (index, slot) in saved.iter().enumerate() {
            let (mut device, hook) = match (&slot.config, &slot.device) {
                (DeviceConfig::Disk(disk), DeviceState::Block(state)) => {
                    hooked(Block::from_state(disk, state)?, |d| {
                        DeviceHook::Disk(d.write_log())
                    })
                }
                (DeviceConfig::Net(net), DeviceState::Net(state)) => {
                    hooked(Net::from_state(net, state, attached_taps)?, |d| {
                        DeviceHook::Net(d.tx_gate(), d.rx_log())
                    })
                }
                (DeviceConfig::Disk(_), _) => {
                    return Err(VirtioError::StateMismatch {
                        index,
                        config: "disk",
                    })
                }
                (DeviceConfig::Net(_), _) => {
                    return Err(VirtioError::StateMismatch {
                        index,
                        config: "NIC",
                    })
                }
            };
            if paused {
                // Before it is activated: a NIC's receive work starts
                // paused, so nothing from its TAP reaches the guest ahead
                // of what is queued for it first.
                device.pause();
            }
            devices.add_slot(vm_fd, mmio, index, slot.config.clone(), hook, |interrupt| {
                MmioTransport::from_state(device, mem.clone(), interrupt, &slot.transport)
                    .map_err(|source| VirtioError::RestoreTransport { index, source })
            })?;
        }
        Ok(devices)
    }

    /// The saved state of every device (the vCPUs and devices must be paused).
    pub fn state(&self) -> Vec<VirtioSlotState> {
        self.slots
            .iter()
            .map(|slot| {
                let transport = slot.transport.lock().expect("transport lock");
                VirtioSlotState {
                    config: slot.config.clone(),
                    device: transport.device().device_state(),
                    transport: transport.state(),
                }
            })
            .collect()
    }

    fn check_count(count: usize) -> Result<(), VirtioError> {
        if count > (VIRTIO_IRQ_LAST - VIRTIO_IRQ_BASE + 1) as usize {
            return Err(VirtioError::TooManyDevices { count });
        }
        Ok(())
    }

    /// Wires device `index`'s interrupt, builds its transport and places it
    /// on the MMIO bus.
    fn add_slot(
        &mut self,
        vm_fd: &VmFd,
        mmio: &Bus,
        index: usize,
        config: DeviceConfig,
        hook: DeviceHook,
        transport: impl FnOnce(Arc<VirtioInterrupt>) -> Result<MmioTransport, VirtioError>,
    ) -> Result<(), VirtioError> {
        let base = VIRTIO_MMIO_START + index as u64 * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_IRQ_BASE + index as u32;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|source| VirtioError::IrqEventFd { index, source })?;
        vm_fd
            .register_irqfd(&irqfd, gsi)
            .map_err(|source| VirtioError::RegisterIrqfd { index, gsi, source })?;
        let transport = Arc::new(Mutex::new(transport(Arc::new(VirtioInterrupt::new(
            irqfd,
        )))?));
        mmio.insert(base, VIRTIO_MMIO_SIZE, transport.clone())
            .map_err(|source| VirtioError::Bus { index, source })?;
        self.slots.push(VirtioSlot {
            base,
            gsi,
            config,
            transport,
            hook,
        });
        Ok(())
    }

    /// The kernel command line with a `virtio_mmio.device=` entry per device.
    pub fn extend_cmdline(&self, cmdline: &str) -> String {
        let mut out = cmdline.to_string();
        for slot in &self.slots {
            out.push_str(&format!(
                " virtio_mmio.device={}K@{:#x}:{}",
                VIRTIO_MMIO_SIZE >> 10,
                slot.base,
                slot.gsi
            ));
        }
        out
    }

    /// The transmit gates of the NICs, in device order.
    pub fn tx_gates(&self) -> Vec<Arc<TxGate>> {
        self.slots
            .iter()
            .filter_map(|s| match &s.hook {
                DeviceHook::Net(g, _) => Some(Arc::clone(g)),
                DeviceHook::Disk(_) => None,
            })
            .collect()
    }

    /// The receive logs of the NICs, in device order.
    pub fn rx_logs(&self) -> Vec<Arc<RxLog>> {
        self.slots
            .iter()
            .filter_map(|s| match &s.hook {
                DeviceHook::Net(_, l) => Some(Arc::clone(l)),
                DeviceHook::Disk(_) => None,
            })
            .collect()
    }

    /// The write records of the disks, in device order.
    pub fn write_logs(&self) -> Vec<Arc<WriteLog>> {
        self.slots
            .iter()
            .filter_map(|s| match &s.hook {
                DeviceHook::Disk(l) => Some(Arc::clone(l)),
                DeviceHook::Net(..) => None,
            })
            .collect()
    }

    /// Stops device activity outside the vCPUs (network receive).
    pub fn pause(&self) {
        for slot in &self.slots {
            slot.transport.lock().expect("transport lock").pause();
        }
    }

    pub fn resume(&self) {
        for slot in &self.slots {
            slot.transport.lock().expect("transport lock").resume();
        }
    }
}

#[cfg(test)]
pub(crate) mod test_queue;
