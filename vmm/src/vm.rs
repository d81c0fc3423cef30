//! Building and running a VM: KVM VM with in-kernel irqchip and PIT, guest
//! RAM in a memfd, the kernel loaded, devices on their buses, vCPU threads.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootSource};
use crate::cpu::boot_regs::{self, BootRegsError};
use crate::cpu::cpuid::{self, CpuidError};
use crate::cpu::runner::{RunnerError, Vcpus};
use crate::devices::bus::{BusError, IoBuses};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::{SerialDevice, SerialOutput, SERIAL_LEN};
use crate::kvm_host::{self, KvmFlavor, KvmHostError};
use crate::layout::{COM1_IRQ, COM1_PORT, KVM_TSS_ADDRESS};
use crate::memory::{self, GuestRam, MemoryError};
use crate::vm_event::VmEvent;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Host(#[from] KvmHostError),
    #[error(
        "/dev/kvm here is {0}: it cannot boot an unmodified Linux guest; \
         run ftvmm on a host with kvm_amd or kvm_intel (on this machine: in a lab node, see `ftctl lab up`)"
    )]
    SoftwareKvm(KvmFlavor),
    #[error("{0} vCPUs requested: between 1 and {max}", max = crate::boot::mptable::max_vcpus())]
    BadVcpuCount(u8),
    #[error("KVM: {what} failed: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error(transparent)]
    BootRegs(#[from] BootRegsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error("creating an eventfd for {what} failed: {source}")]
    EventFd {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the serial log {path}: {source}")]
    SerialLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Where the guest's serial console goes.
#[derive(Debug, Clone)]
pub enum SerialSink {
    Stdout,
    File(PathBuf),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct VmConfig {
    pub vcpus: u8,
    pub mem_mib: u64,
    pub boot: BootSource,
    pub serial: SerialSink,
}

/// A running VM.
pub struct Vm {
    pub started: Instant,
    pub config: VmConfig,
    pub ram: GuestRam,
    pub buses: Arc<IoBuses>,
    vcpus: Option<Vcpus>,
    events: Receiver<VmEvent>,
    _vm_fd: VmFd,
    _kvm: Kvm,
}

impl Vm {
    /// Creates the VM, loads the guest and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        let (kvm, host) = kvm_host::probe()?;
        if !host.flavor.runs_stock_guests() {
            return Err(VmError::SoftwareKvm(host.flavor));
        }
        if config.vcpus == 0 || config.vcpus > crate::boot::mptable::max_vcpus() {
            return Err(VmError::BadVcpuCount(config.vcpus));
        }
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd
            .set_tss_address(KVM_TSS_ADDRESS as usize)
            .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd
            .create_irq_chip()
            .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm_fd.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

        let ram = memory::create(config.mem_mib)?;
        for (slot, region) in ram.memory.iter().enumerate() {
            let host_addr = ram
                .memory
                .get_host_address(region.start_addr())
                .expect("region start is mapped");
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            };
            // SAFETY: the region is a live mapping owned by `ram`, which the
            // Vm keeps until after the VM fd is closed (field order).
            unsafe { vm_fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let entry = boot::load(&ram.memory, ram.size, config.vcpus, &config.boot)?;

        let (events_tx, events) = channel();
        let buses = Arc::new(IoBuses::default());
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(|source| VmError::EventFd {
            what: "the serial IRQ",
            source,
        })?;
        vm_fd
            .register_irqfd(&serial_irq, COM1_IRQ)
            .map_err(kvm_err("KVM_IRQFD (serial)"))?;
        let out: SerialOutput = match &config.serial {
            SerialSink::Stdout => Box::new(std::io::stdout()),
            SerialSink::File(path) => Box::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| VmError::SerialLog {
                        path: path.clone(),
                        source,
                    })?,
            ),
        };
        buses.pio.insert(
            u64::from(COM1_PORT),
            SERIAL_LEN,
            Arc::new(Mutex::new(SerialDevice::new(serial_irq, out))),
        )?;
        buses.pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;

        let base_cpuid = cpuid::supported(&kvm)?;
        let mut vcpu_fds = Vec::new();
        for index in 0..config.vcpus {
            let vcpu = vm_fd
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid::for_vcpu(&base_cpuid, index, config.vcpus))
                .map_err(kvm_err("KVM_SET_CPUID2"))?;
            boot_regs::setup_vcpu_common(&vcpu)?;
            if index == 0 {
                boot_regs::setup_boot_vcpu(&vcpu, &ram.memory, &entry)?;
            }
            vcpu_fds.push(vcpu);
        }
        let vcpus = Vcpus::start(vcpu_fds, Arc::clone(&buses), events_tx)?;
        Ok(Vm {
            started,
            config,
            ram,
            buses,
            vcpus: Some(vcpus),
            events,
            _vm_fd: vm_fd,
            _kvm: kvm,
        })
    }

    /// The running vCPUs (for pause and resume).
    pub fn vcpus(&self) -> &Vcpus {
        self.vcpus.as_ref().expect("vCPUs run until the VM stops")
    }

    /// Blocks until the guest resets, powers off or fails; stops the vCPUs.
    pub fn wait(mut self) -> VmEvent {
        let event = self.events.recv().unwrap_or(VmEvent::Shutdown);
        if let Some(vcpus) = self.vcpus.take() {
            vcpus.stop();
        }
        event
    }
}
