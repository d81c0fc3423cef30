//! Port I/O and MMIO dispatch: address ranges mapped to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};

/// A device on a bus. Offsets are relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("device range {base:#x}+{len:#x} overlaps another device")]
    Overlap { base: u64, len: u64 },
    #[error("device range at {base:#x} has zero length")]
    Empty { base: u64 },
}

type Slot = (u64, Arc<Mutex<dyn BusDevice>>);

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    devices: RwLock<BTreeMap<u64, Slot>>,
}

impl Bus {
    pub fn insert(
        &self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::Empty { base });
        }
        let mut devices = self.devices.write().expect("bus lock");
        let end = base + len;
        let overlaps = devices
            .range(..end)
            .next_back()
            .is_some_and(|(&b, &(l, _))| b + l > base);
        if overlaps {
            return Err(BusError::Overlap { base, len });
        }
        devices.insert(base, (len, device));
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<Mutex<dyn BusDevice>>)> {
        let devices = self.devices.read().expect("bus lock");
        let (&base, (len, dev)) = devices.range(..=addr).next_back()?;
        (addr < base + len).then(|| (addr - base, Arc::clone(dev)))
    }

    /// Reads from the device at `addr`; unclaimed addresses read as all ones.
    pub fn read(&self, addr: u64, data: &mut [u8]) {
        match self.find(addr) {
            Some((offset, dev)) => dev.lock().expect("device lock").read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes to the device at `addr`; writes to unclaimed addresses are dropped.
    pub fn write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, dev)) = self.find(addr) {
            dev.lock().expect("device lock").write(offset, data);
        }
    }
}

/// The VM's two buses.
#[derive(Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data[0] = self.0 + offset as u8;
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_by_range_and_refuse_overlaps() {
        let bus = Bus::default();
        bus.insert(0x100, 8, Arc::new(Mutex::new(Reg(10)))).unwrap();
        assert!(matches!(
            bus.insert(0x104, 8, Arc::new(Mutex::new(Reg(0)))),
            Err(BusError::Overlap { .. })
        ));
        assert!(matches!(
            bus.insert(0xfc, 5, Arc::new(Mutex::new(Reg(0)))),
            Err(BusError::Overlap { .. })
        ));
        bus.insert(0x108, 8, Arc::new(Mutex::new(Reg(50)))).unwrap();
        let mut b = [0u8; 1];
        bus.read(0x103, &mut b);
        assert_eq!(b[0], 13);
        bus.write(0x108, &[7]);
        bus.read(0x108, &mut b);
        assert_eq!(b[0], 7);
        bus.read(0x200, &mut b);
        assert_eq!(b[0], 0xff);
    }
}
