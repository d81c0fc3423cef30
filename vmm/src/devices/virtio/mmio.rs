//! The virtio-mmio transport, version 2 (virtio 1.x "modern" register
//! layout), as a device on the MMIO bus. It owns the driver-visible
//! registers and the queue configuration; at DRIVER_OK it hands the queues
//! to the device.

use std::sync::Arc;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueState, QueueT};

use crate::devices::bus::BusDevice;
use crate::memory::GuestMemoryMmap;

use super::state::{MmioTransportState, QueueConfigState, MMIO_TRANSPORT_STATE_VERSION};
use super::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, INTERRUPT_CONFIG_CHANGE,
    VIRTIO_F_VERSION_1,
};

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x4654_564d; // "FTVM"

const REG_MAGIC_VALUE: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
/// The device-specific configuration space starts here.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    #[error("virtio-mmio state version {found} is not supported (expected {MMIO_TRANSPORT_STATE_VERSION})")]
    StateVersion { found: u32 },
    #[error("saved state is of virtio device type {saved}, the device is type {device}")]
    DeviceType { saved: u32, device: u32 },
    #[error("saved state has {saved} queues, the device has {device}")]
    QueueCount { saved: usize, device: usize },
    #[error("saved queue {index} is invalid: {source:?}")]
    BadQueue {
        index: usize,
        source: virtio_queue::Error,
    },
    #[error("activating the restored device failed: {0}")]
    Activate(#[source] ActivateError),
    #[error(
        "raising the restored device's pending interrupt (status {status:#x}) failed: {source}"
    )]
    RaisePending {
        status: u32,
        #[source]
        source: std::io::Error,
    },
}

/// A virtio device behind its virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<VirtioInterrupt>,
    status: u32,
    device_features_select: u32,
    driver_features_select: u32,
    acked_features: u64,
    queue_select: u32,
    config_generation: u32,
    /// The queues as the driver configured them. While the device is active
    /// it works on copies; these keep the configuration for register reads.
    queues: Vec<Queue>,
    active: bool,
    /// Why the last activation failed (the driver sees DEVICE_NEEDS_RESET).
    pub activate_error: Option<String>,
}

fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&max| Queue::new(max).expect("device queue sizes are powers of two"))
        .collect()
}

fn copy_queue(queue: &Queue) -> Queue {
    Queue::try_from(queue.state()).expect("a configured queue's state is valid")
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let queues = new_queues(device.queue_max_sizes());
        MmioTransport {
            device,
            mem,
            interrupt,
            status: 0,
            device_features_select: 0,
            driver_features_select: 0,
            acked_features: 0,
            queue_select: 0,
            config_generation: 0,
            queues,
            active: false,
            activate_error: None,
        }
    }

    /// Rebuilds the transport from saved state; a device that was active is
    /// activated again with the saved ring positions.
    pub fn from_state(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<VirtioInterrupt>,
        state: &MmioTransportState,
    ) -> Result<Self, MmioError> {
        if state.version != MMIO_TRANSPORT_STATE_VERSION {
            return Err(MmioError::StateVersion {
                found: state.version,
            });
        }
        if state.device_type != device.device_type() {
            return Err(MmioError::DeviceType {
                saved: state.device_type,
                device: device.device_type(),
            });
        }
        if state.queues.len() != device.queue_max_sizes().len() {
            return Err(MmioError::QueueCount {
                saved: state.queues.len(),
                device: device.queue_max_sizes().len(),
            });
        }
        let queues = state
            .queues
            .iter()
            .enumerate()
            .map(|(index, q)| {
                Queue::try_from(QueueState::from(q))
                    .map_err(|source| MmioError::BadQueue { index, source })
            })
            .collect::<Result<Vec<_>, _>>()?;
        interrupt.set_status(state.interrupt_status);
        let mut transport = MmioTransport {
            device,
            mem,
            interrupt,
            status: state.status,
            device_features_select: state.device_features_select,
            driver_features_select: state.driver_features_select,
            acked_features: state.acked_features,
            queue_select: state.queue_select,
            config_generation: state.config_generation,
            queues,
            active: false,
            activate_error: None,
        };
        if state.status & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && state.status & VIRTIO_CONFIG_S_NEEDS_RESET == 0
        {
            transport.activate().map_err(MmioError::Activate)?;
        }
        // After the interrupt controllers' state (restored first): an
        // interrupt the capture may have missed reaches the guest.
        transport
            .interrupt
            .raise_pending()
            .map_err(|source| MmioError::RaisePending {
                status: state.interrupt_status,
                source,
            })?;
        Ok(transport)
    }

    /// The transport's saved state (queue positions from the active device).
    pub fn state(&self) -> MmioTransportState {
        let live = if self.active {
            self.device.queue_states()
        } else {
            None
        };
        let queues = match live {
            Some(states) => states.iter().map(QueueConfigState::from).collect(),
            None => self
                .queues
                .iter()
                .map(|q| QueueConfigState::from(&q.state()))
                .collect(),
        };
        MmioTransportState {
            version: MMIO_TRANSPORT_STATE_VERSION,
            device_type: self.device.device_type(),
            status: self.status,
            device_features_select: self.device_features_select,
            driver_features_select: self.driver_features_select,
            acked_features: self.acked_features,
            queue_select: self.queue_select,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues,
        }
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    #[cfg(test)]
    pub fn is_active(&self) -> bool {
        self.active
    }

    pub fn pause(&mut self) {
        self.device.pause();
    }

    pub fn resume(&mut self) {
        self.device.resume();
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_select as usize)
    }

    /// Queue configuration may change only before DRIVER_OK.
    fn queue_config_writable(&self) -> bool {
        !self.active && self.status & VIRTIO_CONFIG_S_DRIVER_OK == 0
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.status = 0;
        self.device_features_select = 0;
        self.driver_features_select = 0;
        self.acked_features = 0;
        self.queue_select = 0;
        self.queues = new_queues(self.device.queue_max_sizes());
        self.interrupt.set_status(0);
        self.activate_error = None;
    }

    fn activate(&mut self) -> Result<(), ActivateError> {
        for (index, queue) in self.queues.iter().enumerate() {
            if !queue.is_valid(&self.mem) {
                return Err(ActivateError::QueueNotReady { index });
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues: self.queues.iter().map(copy_queue).collect(),
            interrupt: Arc::clone(&self.interrupt),
        };
        self.device.activate(activation)?;
        self.active = true;
        Ok(())
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let mut value = value;
        let newly_set = value & !self.status;
        if newly_set & VIRTIO_CONFIG_S_FEATURES_OK != 0 {
            let offered = self.device.features();
            let acceptable = self.acked_features & !offered == 0
                && self.acked_features & VIRTIO_F_VERSION_1 != 0;
            if !acceptable {
                // The driver reads FEATURES_OK back and gives up.
                value &= !VIRTIO_CONFIG_S_FEATURES_OK;
            }
        }
        self.status = value;
        if newly_set & VIRTIO_CONFIG_S_DRIVER_OK != 0
            && value & VIRTIO_CONFIG_S_FEATURES_OK != 0
            && !self.active
        {
            if let Err(e) = self.activate() {
                self.activate_error = Some(e.to_string());
                self.status |= VIRTIO_CONFIG_S_NEEDS_RESET;
                let _ = self.interrupt.trigger(INTERRUPT_CONFIG_CHANGE);
            }
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC_VALUE => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_select {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_select as usize)
                .map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let config_writable = self.queue_config_writable();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_select = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_select = value,
            REG_DRIVER_FEATURES => {
                let features_open = self.status & VIRTIO_CONFIG_S_DRIVER != 0
                    && self.status & VIRTIO_CONFIG_S_FEATURES_OK == 0;
                if features_open {
                    match self.driver_features_select {
                        0 => {
                            self.acked_features =
                                (self.acked_features & !0xffff_ffff) | u64::from(value)
                        }
                        1 => {
                            self.acked_features =
                                (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32)
                        }
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_select = value,
            REG_QUEUE_NOTIFY if self.active => self.device.queue_notify(value as u16),
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH
                if config_writable =>
            {
                if let Some(queue) = self.selected_queue() {
                    match offset {
                        REG_QUEUE_NUM => queue.set_size(value as u16),
                        REG_QUEUE_READY => queue.set_ready(value == 1),
                        REG_QUEUE_DESC_LOW => queue.set_desc_table_address(Some(value), None),
                        REG_QUEUE_DESC_HIGH => queue.set_desc_table_address(None, Some(value)),
                        REG_QUEUE_DRIVER_LOW => queue.set_avail_ring_address(Some(value), None),
                        REG_QUEUE_DRIVER_HIGH => queue.set_avail_ring_address(None, Some(value)),
                        REG_QUEUE_DEVICE_LOW => queue.set_used_ring_address(Some(value), None),
                        REG_QUEUE_DEVICE_HIGH => queue.set_used_ring_address(None, Some(value)),
                        _ => unreachable!("offset matched above"),
                    }
                }
            }
            _ => {}
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_register(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            if offset.is_multiple_of(4) {
                self.write_register(offset, u32::from_le_bytes(bytes));
            }
        }
    }
}

/// Drives a transport the way the Linux virtio-mmio driver does (tests).
#[cfg(test)]
pub(crate) mod driver {
    use super::*;
    use crate::devices::virtio::test_queue::TestQueue;
    use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_ACKNOWLEDGE;

    pub fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// Negotiates `features` and sets up `queues`; returns the final status.
    pub fn bring_up(t: &mut MmioTransport, features: u64, queues: &[&TestQueue]) -> u32 {
        assert_eq!(read32(t, REG_MAGIC_VALUE), MAGIC_VALUE);
        assert_eq!(read32(t, REG_VERSION), 2);
        write32(t, REG_STATUS, 0);
        write32(t, REG_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        write32(
            t,
            REG_STATUS,
            VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER,
        );
        for sel in 0..2u32 {
            write32(t, REG_DRIVER_FEATURES_SEL, sel);
            write32(t, REG_DRIVER_FEATURES, (features >> (32 * sel)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        write32(t, REG_STATUS, s);
        if read32(t, REG_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK == 0 {
            return read32(t, REG_STATUS);
        }
        for (index, q) in queues.iter().enumerate() {
            write32(t, REG_QUEUE_SEL, index as u32);
            assert!(read32(t, REG_QUEUE_NUM_MAX) >= u32::from(q.size));
            write32(t, REG_QUEUE_NUM, u32::from(q.size));
            write32(t, REG_QUEUE_DESC_LOW, q.desc_table as u32);
            write32(t, REG_QUEUE_DESC_HIGH, (q.desc_table >> 32) as u32);
            write32(t, REG_QUEUE_DRIVER_LOW, q.avail_ring as u32);
            write32(t, REG_QUEUE_DRIVER_HIGH, (q.avail_ring >> 32) as u32);
            write32(t, REG_QUEUE_DEVICE_LOW, q.used_ring as u32);
            write32(t, REG_QUEUE_DEVICE_HIGH, (q.used_ring >> 32) as u32);
            write32(t, REG_QUEUE_READY, 1);
        }
        write32(t, REG_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
        read32(t, REG_STATUS)
    }

    pub fn notify(t: &mut MmioTransport, queue: u32) {
        write32(t, REG_QUEUE_NOTIFY, queue);
    }

    pub fn ack_interrupt(t: &mut MmioTransport) -> u32 {
        let status = read32(t, REG_INTERRUPT_STATUS);
        write32(t, REG_INTERRUPT_ACK, status);
        status
    }
}

#[cfg(test)]
mod tests {
    use super::driver::*;
    use super::*;
    use crate::devices::virtio::test_queue::{test_memory, TestQueue};
    use crate::devices::virtio::INTERRUPT_USED_BUFFER;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    /// A device that echoes: each chain's readable bytes are copied into its
    /// writable bytes; it records its lifecycle.
    struct Echo {
        mem: Option<GuestMemoryMmap>,
        queues: Vec<Queue>,
        interrupt: Option<Arc<VirtioInterrupt>>,
        config: [u8; 8],
        resets: usize,
    }

    impl VirtioDevice for Echo {
        fn device_state(&self) -> crate::devices::virtio::DeviceState {
            // The test device has no state of its own; any variant will do.
            crate::devices::virtio::DeviceState::Block(
                crate::devices::virtio::block::state::BlockState {
                    version: 0,
                    read_only: false,
                    capacity_sectors: 0,
                },
            )
        }
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | 1 << 3
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            let start = offset as usize;
            data.copy_from_slice(&self.config[start..start + data.len()]);
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = offset as usize;
            self.config[start..start + data.len()].copy_from_slice(data);
        }
        fn activate(&mut self, a: Activation) -> Result<(), ActivateError> {
            self.mem = Some(a.mem);
            self.queues = a.queues;
            self.interrupt = Some(a.interrupt);
            Ok(())
        }
        fn queue_notify(&mut self, queue_index: u16) {
            let mem = self.mem.as_ref().unwrap();
            let queue = &mut self.queues[usize::from(queue_index)];
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let descs: Vec<_> = chain.collect();
                let mut input = Vec::new();
                for d in descs.iter().filter(|d| !d.is_write_only()) {
                    let mut b = vec![0u8; d.len() as usize];
                    mem.read_slice(&mut b, d.addr()).unwrap();
                    input.extend_from_slice(&b);
                }
                let out = descs.iter().find(|d| d.is_write_only()).unwrap();
                mem.write_slice(&input, out.addr()).unwrap();
                queue.add_used(mem, head, input.len() as u32).unwrap();
            }
            self.interrupt
                .as_ref()
                .unwrap()
                .trigger(INTERRUPT_USED_BUFFER)
                .unwrap();
        }
        fn reset(&mut self) {
            self.queues.clear();
            self.mem = None;
            self.resets += 1;
        }
        fn queue_states(&self) -> Option<Vec<QueueState>> {
            self.mem
                .as_ref()
                .map(|_| self.queues.iter().map(|q| q.state()).collect())
        }
    }

    fn echo() -> Box<Echo> {
        Box::new(Echo {
            mem: None,
            queues: Vec::new(),
            interrupt: None,
            config: *b"abcdefgh",
            resets: 0,
        })
    }

    fn interrupt() -> Arc<VirtioInterrupt> {
        Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ))
    }

    #[test]
    fn registers_negotiation_queue_round_trip_and_state() {
        let mem = test_memory();
        let irq = interrupt();
        let mut t = MmioTransport::new(echo(), mem.clone(), irq.clone());
        assert_eq!(read32(&mut t, REG_DEVICE_ID), 42);
        write32(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read32(&mut t, REG_DEVICE_FEATURES), 1);
        write32(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read32(&mut t, REG_DEVICE_FEATURES), 1 << 3);
        let mut cfg = [0u8; 2];
        t.read(CONFIG_SPACE_OFFSET + 2, &mut cfg);
        assert_eq!(&cfg, b"cd");

        let q = TestQueue::new(&mem, 0x10000, 8);
        // A feature the device does not offer: FEATURES_OK is refused.
        let status = bring_up(&mut t, VIRTIO_F_VERSION_1 | 1 << 4, &[&q]);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);
        assert!(!t.is_active());
        // Without VERSION_1 (a legacy driver): refused too.
        let status = bring_up(&mut t, 1 << 3, &[&q]);
        assert_eq!(status & VIRTIO_CONFIG_S_FEATURES_OK, 0);

        let status = bring_up(&mut t, VIRTIO_F_VERSION_1 | 1 << 3, &[&q]);
        assert_ne!(status & VIRTIO_CONFIG_S_DRIVER_OK, 0, "{status:#x}");
        assert!(t.is_active());

        mem.write_slice(b"hello", GuestAddress(0x20000)).unwrap();
        q.add_chain(&mem, &[(0x20000, 5, false), (0x21000, 16, true)]);
        notify(&mut t, 0);
        assert_eq!(q.used_idx(&mem), 1);
        assert_eq!(q.used_elem(&mem, 0), (0, 5));
        let mut out = [0u8; 5];
        mem.read_slice(&mut out, GuestAddress(0x21000)).unwrap();
        assert_eq!(&out, b"hello");
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        assert_eq!(ack_interrupt(&mut t), INTERRUPT_USED_BUFFER);
        assert_eq!(read32(&mut t, REG_INTERRUPT_STATUS), 0);

        let saved = t.state();
        assert_eq!(saved.queues[0].next_avail, 1);
        assert_eq!(saved.queues[0].next_used, 1);
        assert_eq!(saved.queues[0].size, 8);
        assert_eq!(saved.acked_features, VIRTIO_F_VERSION_1 | 1 << 3);

        // Restored elsewhere, the device goes on from the saved positions.
        let restored_irq = interrupt();
        let mut restored =
            MmioTransport::from_state(echo(), mem.clone(), restored_irq.clone(), &saved)
                .expect("restore");
        assert!(restored.is_active());
        assert!(
            restored_irq.irqfd().read().is_err(),
            "nothing pending, nothing raised"
        );
        mem.write_slice(b"again", GuestAddress(0x22000)).unwrap();
        q.add_chain(&mem, &[(0x22000, 5, false), (0x23000, 16, true)]);
        notify(&mut restored, 0);
        assert_eq!(q.used_idx(&mem), 2);
        assert_eq!(restored.state().queues[0].next_used, 2);

        // Reset: inactive, queues back to their defaults.
        write32(&mut restored, REG_STATUS, 0);
        assert!(!restored.is_active());
        assert!(!restored.state().queues[0].ready);
        assert_eq!(read32(&mut restored, REG_STATUS), 0);

        let mut wrong = saved.clone();
        wrong.device_type = 2;
        assert!(matches!(
            MmioTransport::from_state(echo(), mem, interrupt(), &wrong),
            Err(MmioError::DeviceType {
                saved: 2,
                device: 42
            })
        ));
    }

    /// A buffer used just before a capture: its interrupt was raised (the
    /// irqfd written) but the capture's interrupt controllers may not hold
    /// it yet. The restored transport raises it again, once.
    #[test]
    fn an_interrupt_pending_at_capture_is_raised_again_on_restore() {
        let mem = test_memory();
        let irq = interrupt();
        let mut t = MmioTransport::new(echo(), mem.clone(), irq.clone());
        let q = TestQueue::new(&mem, 0x10000, 8);
        bring_up(&mut t, VIRTIO_F_VERSION_1 | 1 << 3, &[&q]);
        q.add_chain(&mem, &[(0x20000, 5, false), (0x21000, 16, true)]);
        notify(&mut t, 0);
        assert_eq!(irq.irqfd().read().unwrap(), 1);
        let saved = t.state();
        assert_eq!(
            saved.interrupt_status, INTERRUPT_USED_BUFFER,
            "not acknowledged"
        );

        let restored_irq = interrupt();
        let mut restored =
            MmioTransport::from_state(echo(), mem.clone(), restored_irq.clone(), &saved)
                .expect("restore");
        assert_eq!(restored_irq.irqfd().read().unwrap(), 1, "raised again");
        assert!(restored_irq.irqfd().read().is_err(), "once");
        assert_eq!(ack_interrupt(&mut restored), INTERRUPT_USED_BUFFER);
    }

    #[test]
    fn driver_ok_with_a_queue_outside_memory_asks_for_reset() {
        let mem = test_memory();
        let mut t = MmioTransport::new(echo(), mem.clone(), interrupt());
        let mut q = TestQueue::new(&mem, 0x10000, 8);
        q.used_ring = 0x4000_0000; // beyond the test memory
        let status = bring_up(&mut t, VIRTIO_F_VERSION_1, &[&q]);
        assert_ne!(status & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!t.is_active());
        assert!(t.activate_error.is_some());
        assert_eq!(
            read32(&mut t, REG_INTERRUPT_STATUS),
            INTERRUPT_CONFIG_CHANGE
        );
    }
}
