//! The part of the i8042 keyboard controller a guest uses to reset the
//! machine: command 0xFE on port 0x64 pulses the CPU reset line. Everything
//! else reads as "no keyboard".

use std::sync::mpsc::Sender;

use crate::devices::bus::BusDevice;
use crate::vm_event::{ResetCause, VmEvent};

/// Ports 0x60 (data) to 0x64 (command/status).
pub const I8042_BASE: u64 = 0x60;
pub const I8042_LEN: u64 = 5;
const COMMAND_OFFSET: u64 = 4;
const CMD_RESET_CPU: u8 = 0xfe;

pub struct I8042 {
    events: Sender<VmEvent>,
}

impl I8042 {
    pub fn new(events: Sender<VmEvent>) -> Self {
        I8042 { events }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_RESET_CPU) {
            let _ = self
                .events
                .send(VmEvent::Reset(ResetCause::KeyboardController));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_reports_a_reset_and_nothing_else_does() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut dev = I8042::new(tx);
        dev.write(0, &[CMD_RESET_CPU]);
        dev.write(COMMAND_OFFSET, &[0xaa]);
        assert!(rx.try_recv().is_err());
        dev.write(COMMAND_OFFSET, &[CMD_RESET_CPU]);
        assert_eq!(
            rx.try_recv(),
            Ok(VmEvent::Reset(ResetCause::KeyboardController))
        );
    }
}
