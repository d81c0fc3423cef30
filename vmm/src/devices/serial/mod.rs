//! The 8250 UART on COM1 (vm-superio), its output to a log file or stdout,
//! its interrupt through an irqfd.

pub mod state;

use std::io::Write;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::bus::BusDevice;
use state::SerialDeviceState;

pub const SERIAL_LEN: u64 = 8;

/// Raises the serial IRQ by writing to an eventfd registered as an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), std::io::Error> {
        self.0.write(1)
    }
}

pub type SerialOutput = Box<dyn Write + Send>;

pub struct SerialDevice {
    pub serial: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialOutput>,
}

impl SerialDevice {
    pub fn new(irq: EventFd, out: SerialOutput) -> Self {
        SerialDevice {
            serial: Serial::new(IrqTrigger(irq), out),
        }
    }

    /// A device continuing from saved registers.
    pub fn from_state(
        irq: EventFd,
        out: SerialOutput,
        saved: &SerialDeviceState,
    ) -> Result<Self, SerialError> {
        let serial = Serial::from_state(
            &saved.into(),
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(SerialDevice { serial })
    }

    pub fn state(&self) -> SerialDeviceState {
        SerialDeviceState::from(&self.serial.state())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("restoring the serial device failed: {0}")]
    Restore(String),
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(b) = data.first_mut() {
            *b = self.serial.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&b) = data.first() {
            // An output error (a closed log) must not stop the guest.
            let _ = self.serial.write(offset as u8, b);
        }
    }
}
