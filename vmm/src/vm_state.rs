//! The VM-wide KVM state: the two PICs, the IOAPIC, the PIT and kvmclock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

pub const VM_STATE_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum VmStateError {
    #[error("{what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(
        "VM state version {found} is not supported (this ftvmm reads version {VM_STATE_VERSION})"
    )]
    Version { found: u32 },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmStateError {
    move |source| VmStateError::Kvm { what, source }
}

#[derive(Serialize, Deserialize)]
pub struct VmState {
    pub version: u32,
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

fn get_chip(vm: &VmFd, chip_id: u32, what: &'static str) -> Result<kvm_irqchip, VmStateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip).map_err(kvm(what))?;
    Ok(chip)
}

/// Captures the VM-wide state; the vCPUs must be paused.
pub fn capture(vm: &VmFd) -> Result<VmState, VmStateError> {
    Ok(VmState {
        version: VM_STATE_VERSION,
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
        pit: vm.get_pit2().map_err(kvm("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm("KVM_GET_CLOCK"))?,
    })
}

/// Restores the VM-wide state into a VM created with irqchip and PIT. When
/// the saved clock carries the host's wall-clock time, KVM advances the
/// guest clock by the real time that passed since the capture
/// (`KVM_CLOCK_REALTIME`), so the guest sees time move on, not stand still.
pub fn restore(vm: &VmFd, state: &VmState) -> Result<(), VmStateError> {
    if state.version != VM_STATE_VERSION {
        return Err(VmStateError::Version {
            found: state.version,
        });
    }
    vm.set_pit2(&state.pit).map_err(kvm("KVM_SET_PIT2"))?;
    let mut clock = state.clock;
    clock.flags &= KVM_CLOCK_REALTIME;
    vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    vm.set_irqchip(&state.pic_master)
        .map_err(kvm("KVM_SET_IRQCHIP (PIC master)"))?;
    vm.set_irqchip(&state.pic_slave)
        .map_err(kvm("KVM_SET_IRQCHIP (PIC slave)"))?;
    vm.set_irqchip(&state.ioapic)
        .map_err(kvm("KVM_SET_IRQCHIP (IOAPIC)"))?;
    Ok(())
}
