//! Building and running a VM: KVM VM with in-kernel irqchip and PIT, guest
//! RAM in a memfd, the kernel loaded, devices on their buses, vCPU threads.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::CpuId;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootError, BootSource};
use crate::cpu::boot_regs::{self, BootRegsError};
use crate::cpu::cpuid::{self, CpuidError};
use crate::cpu::runner::{RunnerError, Vcpus};
use crate::cpu::state::{self as vcpu_state, VcpuStateError};
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
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
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
    pub buses: Arc<IoBuses>,
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The CPUID table of each vCPU (recorded for capture and compatibility).
    pub cpuids: Vec<CpuId>,
    /// The MSRs captured with each vCPU.
    pub msr_indices: Vec<u32>,
    vcpus: Option<Vcpus>,
    events: Receiver<VmEvent>,
    // Drop order: the VM fd goes before the RAM it maps.
    pub vm_fd: VmFd,
    pub ram: GuestRam,
    pub kvm: Kvm,
}

/// The parts of a VM that booting and restoring share.
struct Machine {
    kvm: Kvm,
    vm_fd: VmFd,
    ram: GuestRam,
    buses: Arc<IoBuses>,
    serial: Arc<Mutex<SerialDevice>>,
    events_tx: Sender<VmEvent>,
    events: Receiver<VmEvent>,
}

impl Machine {
    /// KVM VM with irqchip and PIT, guest RAM registered with dirty
    /// logging, the legacy devices on their buses.
    fn create(config: &VmConfig) -> Result<Machine, VmError> {
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
        let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, out)));
        buses
            .pio
            .insert(u64::from(COM1_PORT), SERIAL_LEN, serial.clone())?;
        buses.pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        Ok(Machine {
            kvm,
            vm_fd,
            ram,
            buses,
            serial,
            events_tx,
            events,
        })
    }

    fn create_vcpus(&self, count: u8) -> Result<Vec<VcpuFd>, VmError> {
        (0..count)
            .map(|index| {
                self.vm_fd
                    .create_vcpu(u64::from(index))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect()
    }

    /// Starts the vCPU threads and hands the machine over as a running VM.
    fn start(
        self,
        config: VmConfig,
        started: Instant,
        vcpu_fds: Vec<VcpuFd>,
        cpuids: Vec<CpuId>,
        msr_indices: Vec<u32>,
    ) -> Result<Vm, VmError> {
        let vcpus = Vcpus::start(vcpu_fds, Arc::clone(&self.buses), self.events_tx)?;
        Ok(Vm {
            started,
            config,
            buses: self.buses,
            serial: self.serial,
            cpuids,
            msr_indices,
            vcpus: Some(vcpus),
            events: self.events,
            vm_fd: self.vm_fd,
            ram: self.ram,
            kvm: self.kvm,
        })
    }
}

impl Vm {
    /// Creates the VM, loads the guest and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        let machine = Machine::create(&config)?;
        // Devices that the guest finds through the command line are attached
        // here, before the kernel and its command line are loaded.
        let boot_source = config.boot.clone();
        let entry = boot::load(
            &machine.ram.memory,
            machine.ram.size,
            config.vcpus,
            &boot_source,
        )?;

        let base_cpuid = cpuid::supported(&machine.kvm)?;
        let vcpu_fds = machine.create_vcpus(config.vcpus)?;
        let mut cpuids = Vec::new();
        for (index, vcpu) in vcpu_fds.iter().enumerate() {
            let table = cpuid::for_vcpu(&base_cpuid, index as u8, config.vcpus);
            vcpu.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
            boot_regs::setup_vcpu_common(vcpu)?;
            if index == 0 {
                boot_regs::setup_boot_vcpu(vcpu, &machine.ram.memory, &entry)?;
            }
            cpuids.push(table);
        }
        let msr_indices = vcpu_state::saveable_msrs(&machine.kvm, &vcpu_fds[0])?;
        machine.start(config, started, vcpu_fds, cpuids, msr_indices)
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

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(vcpus) = self.vcpus.take() {
            vcpus.stop();
        }
    }
}
