//! Building and running a VM: KVM VM with in-kernel irqchip and PIT, guest
//! RAM in a memfd, the kernel loaded, devices on their buses, vCPU threads.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
use crate::cpu::features::FeatureSet;
use crate::cpu::runner::{RunnerError, Vcpus};
use crate::cpu::state::{self as vcpu_state, VcpuStateError};
use crate::devices::bus::{BusError, IoBuses};
use crate::devices::i8042::{I8042, I8042_BASE, I8042_LEN};
use crate::devices::serial::state::SerialDeviceState;
use crate::devices::serial::{SerialDevice, SerialError, SerialOutput, SERIAL_LEN};
use crate::devices::virtio::block::{self, DiskConfig};
use crate::devices::virtio::net::tap::AttachedTaps;
use crate::devices::virtio::net::NetConfig;
use crate::devices::virtio::{DeviceConfig, VirtioDevices, VirtioError};
use crate::dirty::{DirtyLog, DirtyLogError, DirtyMethod, DirtyPages, DirtyTracking};
use crate::kvm_host::{self, KvmFlavor, KvmHostError};
use crate::layout::{COM1_IRQ, COM1_PORT, KVM_TSS_ADDRESS};
use crate::memory::{self, GuestMemoryMmap, GuestRam, MemoryError};
use crate::metrics::VmCounters;
use crate::replication::{DiskWrites, Input, Output};
use crate::snapshot::{self, CaptureTimes, MachineState, SnapshotError};
use crate::vm_event::VmEvent;
use crate::vm_state::{self, VmStateError};

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
    #[error("guest RAM of {given} bytes given for a VM of {expected} bytes")]
    RamSize { given: u64, expected: u64 },
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Cpuid(#[from] CpuidError),
    #[error("this host's CPU lacks features the VM was given (feature set {features}): {}", missing.join(", "))]
    IncompatibleCpu {
        features: FeatureSet,
        missing: Vec<String>,
    },
    #[error(transparent)]
    BootRegs(#[from] BootRegsError),
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Runner(#[from] RunnerError),
    #[error(transparent)]
    VcpuState(#[from] VcpuStateError),
    #[error(transparent)]
    VmState(#[from] VmStateError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    Serial(#[from] SerialError),
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    #[error(transparent)]
    Virtio(#[from] VirtioError),
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

/// Guest RAM slots: (slot, guest physical base, bytes). One slot below the
/// MMIO hole.
fn ram_layout(mem_mib: u64) -> Vec<(u32, u64, u64)> {
    vec![(0, 0, mem_mib << 20)]
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
    /// virtio-blk disks (vda, vdb, ... in this order), then virtio-net NICs.
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// The declared CPU feature set the guest is given.
    pub cpu_features: FeatureSet,
    /// How dirty pages are tracked (the ring where KVM has it, by default).
    pub dirty_tracking: DirtyTracking,
    /// Guest RAM in this file (on a tmpfs), made new at boot, instead of
    /// an anonymous memfd: it outlives the process ([`memory::open_file`]).
    pub ram_file: Option<std::path::PathBuf>,
}

/// Whether a VM's vCPUs run (and its devices take frames in) as soon as it
/// is made, or wait for [`Vm::resume`] (a promoted replica: its
/// announcement and the output it hands over leave first, without the
/// guest competing for the CPU, and the frames replayed into it come
/// before any from its TAPs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartAs {
    Running,
    Paused,
}

/// A running VM. Its parts are the VMM's own; the FT engine drives it
/// through the methods of `replication`.
pub struct Vm {
    pub(crate) started: Instant,
    pub(crate) config: VmConfig,
    pub(crate) serial: Arc<Mutex<SerialDevice>>,
    /// The CPUID table of each vCPU (recorded for capture and compatibility).
    pub(crate) cpuids: Vec<CpuId>,
    /// The MSRs captured with each vCPU.
    pub(crate) msr_indices: Vec<u32>,
    /// Each vCPU's TSC rate (kHz; 0 where KVM does not tell), read once at
    /// the start: only this process sets it, and the captures of 50-500
    /// checkpoints a second need not ask KVM again.
    pub(crate) tsc_khz: Vec<u32>,
    vcpus: Vcpus,
    events: Mutex<Receiver<VmEvent>>,
    pub(crate) counters: VmCounters,
    pub(crate) dirty_log: DirtyLog,
    /// The virtio-mmio devices (also on the MMIO bus); pause/resume/state.
    pub(crate) virtio: VirtioDevices,
    /// The NICs' output and the disks' write records, VM-wide.
    pub(crate) output: Output,
    pub(crate) input: Input,
    pub(crate) disk_writes: DiskWrites,
    // Drop order: the VM fd goes before the RAM it maps.
    pub(crate) vm_fd: VmFd,
    pub(crate) ram: GuestRam,
    /// Kept open for the VM's life.
    _kvm: Kvm,
}

/// The KVM half of a machine: the VM with its irqchip and PIT, guest RAM
/// registered with dirty tracking, and its vCPUs (not yet set up). Making
/// it is most of a restore's time (about 185 ms of 290 on a lab node), so
/// a standby makes it for its replica while it stands by
/// ([`crate::replication::ReplicaRam::prepare_vm`]).
pub struct VmShell {
    dirty_log: DirtyLog,
    vcpu_fds: Vec<VcpuFd>,
    vm_fd: VmFd,
    kvm: Kvm,
    mem_mib: u64,
    dirty_tracking: DirtyTracking,
    /// The mapping the VM's memory regions point at, kept alive while the
    /// VM fd is (the field after `vm_fd`: dropped after it).
    _memory: GuestMemoryMmap,
}

/// What a standby made for its replica while standing by, for the restore
/// that promotes it to take instead of making it then.
#[derive(Default)]
pub(crate) struct MadeAhead {
    pub shell: Option<VmShell>,
    /// TAPs attached for the NICs.
    pub taps: AttachedTaps,
}

impl VmShell {
    /// The KVM VM for `vcpus` vCPUs over `ram` (mapped in the guest as it
    /// is), tracking dirty pages by `dirty_tracking`.
    pub(crate) fn create(
        memory: &GuestMemoryMmap,
        mem_mib: u64,
        vcpus: u8,
        dirty_tracking: DirtyTracking,
    ) -> Result<VmShell, VmError> {
        let (kvm, host) = kvm_host::probe()?;
        if !host.flavor.runs_stock_guests() {
            return Err(VmError::SoftwareKvm(host.flavor));
        }
        if vcpus == 0 || vcpus > crate::boot::mptable::max_vcpus() {
            return Err(VmError::BadVcpuCount(vcpus));
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
        let dirty_log = DirtyLog::enable(&vm_fd, &ram_layout(mem_mib), dirty_tracking)?;
        for (slot, region) in memory.iter().enumerate() {
            let host_addr = memory
                .get_host_address(region.start_addr())
                .expect("region start is mapped");
            let mem_region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
                flags: KVM_MEM_LOG_DIRTY_PAGES,
            };
            // SAFETY: the region is a live mapping of `memory`, a clone of
            // which the shell keeps (and the Vm after it) until after the VM
            // fd is closed (field order).
            unsafe { vm_fd.set_user_memory_region(mem_region) }
                .map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        let vcpu_fds = (0..vcpus)
            .map(|index| {
                vm_fd
                    .create_vcpu(u64::from(index))
                    .map_err(kvm_err("KVM_CREATE_VCPU"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        dirty_log.attach_vcpus(&vcpu_fds)?;
        Ok(VmShell {
            dirty_log,
            vcpu_fds,
            vm_fd,
            kvm,
            mem_mib,
            dirty_tracking,
            _memory: memory.clone(),
        })
    }

    /// Whether it is the shell a VM of `config` needs.
    fn fits(&self, config: &VmConfig) -> bool {
        self.vcpu_fds.len() == usize::from(config.vcpus)
            && self.mem_mib == config.mem_mib
            && self.dirty_tracking == config.dirty_tracking
    }
}

/// The parts of a VM that booting and restoring share.
struct Machine {
    dirty_log: DirtyLog,
    /// Taken when the vCPUs are set up.
    vcpu_fds: Vec<VcpuFd>,
    /// The KVM half was made ahead (not by this restore).
    made_ahead: bool,
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
    /// `ram`: guest RAM to use as it is (a replica being promoted, a
    /// restored memory file); fresh zeroed RAM when `None`.
    /// `shell`: the KVM half made ahead for this RAM (used if it fits
    /// `config`, else made now).
    fn create(
        config: &VmConfig,
        serial_state: Option<&SerialDeviceState>,
        ram: Option<GuestRam>,
        shell: Option<VmShell>,
    ) -> Result<Machine, VmError> {
        let ram = match ram {
            Some(ram) if ram.size != config.mem_mib << 20 => {
                return Err(VmError::RamSize {
                    given: ram.size,
                    expected: config.mem_mib << 20,
                })
            }
            Some(ram) => ram,
            None => match &config.ram_file {
                Some(path) => {
                    let ram = memory::open_file(path, config.mem_mib, false)?.0;
                    // The guest runs on it: no label may say what it holds.
                    if let Err(error) =
                        crate::replication::ram_label::RamLabel::take(path, &ram.memfd)
                    {
                        tracing::warn!(%error, "the RAM file's label could not be cleared");
                    }
                    ram
                }
                None => memory::create(config.mem_mib)?,
            },
        };
        let made_ahead = shell.as_ref().is_some_and(|s| s.fits(config));
        let shell = match shell {
            Some(shell) if made_ahead => shell,
            other => {
                if other.is_some() {
                    tracing::warn!("the VM made ahead does not fit the checkpoint: making another");
                }
                VmShell::create(
                    &ram.memory,
                    config.mem_mib,
                    config.vcpus,
                    config.dirty_tracking,
                )?
            }
        };
        let VmShell {
            dirty_log,
            vcpu_fds,
            vm_fd,
            kvm,
            ..
        } = shell;

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
        let serial = match serial_state {
            Some(saved) => SerialDevice::from_state(serial_irq, out, saved)?,
            None => SerialDevice::new(serial_irq, out),
        };
        let serial = Arc::new(Mutex::new(serial));
        buses
            .pio
            .insert(u64::from(COM1_PORT), SERIAL_LEN, serial.clone())?;
        buses.pio.insert(
            I8042_BASE,
            I8042_LEN,
            Arc::new(Mutex::new(I8042::new(events_tx.clone()))),
        )?;
        Ok(Machine {
            dirty_log,
            vcpu_fds,
            made_ahead,
            kvm,
            vm_fd,
            ram,
            buses,
            serial,
            events_tx,
            events,
        })
    }

    /// The vCPUs (made with the VM), to set up.
    fn take_vcpus(&mut self) -> Vec<VcpuFd> {
        std::mem::take(&mut self.vcpu_fds)
    }

    /// The gates of the VM's NICs (its output), each with its MAC: made
    /// before the vCPUs start, so that a restore can announce the guest on
    /// this node before it runs.
    fn output_of(config: &VmConfig, virtio: &VirtioDevices) -> Output {
        let macs = config.nets.iter().map(|n| n.mac);
        Output::new(virtio.tx_gates().into_iter().zip(macs).collect())
    }

    /// Starts the vCPU threads (parked until [`Vm::resume`] with
    /// [`StartAs::Paused`]) and hands the machine over as a VM.
    #[allow(clippy::too_many_arguments)]
    fn start(
        self,
        config: VmConfig,
        started: Instant,
        vcpu_fds: Vec<VcpuFd>,
        cpuids: Vec<CpuId>,
        msr_indices: Vec<u32>,
        virtio: VirtioDevices,
        output: Output,
        start_as: StartAs,
    ) -> Result<Vm, VmError> {
        let tsc_khz = vcpu_fds
            .iter()
            .map(|fd| fd.get_tsc_khz().unwrap_or(0))
            .collect();
        let vcpus = Vcpus::start(
            vcpu_fds,
            Arc::clone(&self.buses),
            self.events_tx,
            self.dirty_log.ring().cloned(),
            start_as == StartAs::Paused,
        )?;
        let taps = virtio.tx_gates().iter().map(|g| g.tap()).collect();
        let input = Input::new(virtio.rx_logs(), taps);
        let disk_writes = DiskWrites::new(virtio.write_logs());
        Ok(Vm {
            started,
            config,
            serial: self.serial,
            cpuids,
            msr_indices,
            tsc_khz,
            vcpus,
            events: Mutex::new(self.events),
            counters: VmCounters::default(),
            dirty_log: self.dirty_log,
            virtio,
            output,
            input,
            disk_writes,
            vm_fd: self.vm_fd,
            ram: self.ram,
            _kvm: self.kvm,
        })
    }
}

impl Vm {
    /// Creates the VM, loads the guest and starts its vCPUs.
    pub fn boot(config: VmConfig) -> Result<Vm, VmError> {
        let started = Instant::now();
        // A copy of this VM still running on this node holds its disks:
        // refused here, before the RAM file is replaced.
        let _disks_held = block::lock_disks(&config.disks).map_err(VirtioError::from)?;
        let mut machine = Machine::create(&config, None, None, None)?;
        // Devices that the guest finds through the command line are attached
        // here, before the kernel and its command line are loaded.
        let virtio = VirtioDevices::attach(
            &machine.vm_fd,
            &machine.ram.memory,
            &machine.buses.mmio,
            &config.disks,
            &config.nets,
        )?;
        let boot_source = BootSource {
            cmdline: virtio.extend_cmdline(&config.boot.cmdline),
            ..config.boot.clone()
        };
        let entry = boot::load(
            &machine.ram.memory,
            machine.ram.size,
            config.vcpus,
            &boot_source,
        )?;

        let base_cpuid = cpuid::supported(&machine.kvm)?;
        let tsc_deadline = cpuid::tsc_deadline_supported(&machine.kvm);
        let feature_words = config.cpu_features.words();
        let vcpu_fds = machine.take_vcpus();
        let mut cpuids = Vec::new();
        for (index, vcpu) in vcpu_fds.iter().enumerate() {
            let table = cpuid::for_vcpu(
                &base_cpuid,
                &feature_words,
                index as u8,
                config.vcpus,
                tsc_deadline,
            );
            vcpu.set_cpuid2(&table).map_err(kvm_err("KVM_SET_CPUID2"))?;
            boot_regs::setup_vcpu_common(vcpu)?;
            if index == 0 {
                boot_regs::setup_boot_vcpu(vcpu, &machine.ram.memory, &entry)?;
            }
            cpuids.push(table);
        }
        let msr_indices = vcpu_state::saveable_msrs(&machine.kvm, &vcpu_fds[0])?;
        let output = Machine::output_of(&config, &virtio);
        let vm = machine.start(
            config,
            started,
            vcpu_fds,
            cpuids,
            msr_indices,
            virtio,
            output,
            StartAs::Running,
        )?;
        tracing::info!(
            vcpus = vm.config.vcpus,
            mem_mib = vm.config.mem_mib,
            protocol = ?entry.protocol,
            cpu_features = %vm.config.cpu_features,
            virtio_devices = vm.virtio.slots.len(),
            dirty_tracking = %vm.dirty_log.method(),
            setup_us = started.elapsed().as_micros() as u64,
            "guest booting"
        );
        Ok(vm)
    }

    /// Continues the VM captured in `dir` (see [`Vm::capture_to_dir`]).
    pub fn restore(dir: &Path, serial: SerialSink) -> Result<Vm, VmError> {
        let started = Instant::now();
        let state = snapshot::read_state(dir)?;
        let ram = memory::create(state.mem_mib)?;
        snapshot::read_memory(dir, &ram.memfd, ram.size)?;
        let vm = Vm::restore_from(
            state,
            ram,
            MadeAhead::default(),
            serial,
            started,
            |_| {},
            StartAs::Running,
        )?;
        tracing::info!(dir = %dir.display(), "restored from a capture directory");
        Ok(vm)
    }

    /// Continues a VM from its state and its memory as they are (no copy of
    /// memory: a standby promotes its replica this way, through
    /// `Vm::restore_replica`). `before_run` is called once every device
    /// and its backing (TAPs included) exists, just before the vCPUs start
    /// (or park, with [`StartAs::Paused`]), with the VM's output (its NICs'
    /// gates: frames of the host's own, such as an announcement, can leave
    /// from there).
    pub(crate) fn restore_from(
        mut state: MachineState,
        ram: GuestRam,
        ahead: MadeAhead,
        serial: SerialSink,
        started: Instant,
        before_run: impl FnOnce(&Output),
        start_as: StartAs,
    ) -> Result<Vm, VmError> {
        let MadeAhead {
            shell,
            taps: mut attached_taps,
        } = ahead;
        let config = VmConfig {
            vcpus: state.vcpu_count,
            mem_mib: state.mem_mib,
            boot: BootSource {
                kernel: PathBuf::new(),
                initrd: None,
                cmdline: String::new(),
            },
            serial,
            disks: state
                .virtio
                .iter()
                .filter_map(|s| match &s.config {
                    DeviceConfig::Disk(d) => Some(d.clone()),
                    DeviceConfig::Net(_) => None,
                })
                .collect(),
            nets: state
                .virtio
                .iter()
                .filter_map(|s| match &s.config {
                    DeviceConfig::Net(n) => Some(n.clone()),
                    DeviceConfig::Disk(_) => None,
                })
                .collect(),
            cpu_features: state.cpu_features,
            // A restored VM tracks as any VM does by default.
            dirty_tracking: DirtyTracking::default(),
            // Its RAM is given.
            ram_file: None,
        };
        let mut machine = Machine::create(&config, Some(&state.serial), Some(ram), shell)?;
        // The memory is the checkpoint's: the dirty log counts from here,
        // before the restore itself writes any of it (KVM writes the
        // guest's wall clock when its MSR is restored; the NICs take
        // frames in once activated), not "every page" as a new VM's first
        // harvest does, nor what was written to the memory before (a
        // replica's epochs). What differs from the checkpoint is known.
        machine
            .dirty_log
            .harvest(&machine.vm_fd, &machine.ram.memory)
            .map_err(VmError::DirtyLog)?;
        let created_us = started.elapsed().as_micros() as u64;
        let made_ahead = machine.made_ahead;
        let gap =
            Duration::from_nanos(snapshot::unix_now_ns().saturating_sub(state.captured_unix_ns));
        // Invariant: a VM runs only where every CPU feature it was given
        // exists; otherwise say which ones are missing.
        let host = cpuid::host_features(&cpuid::supported(&machine.kvm)?);
        for saved in &state.vcpus {
            let missing = crate::cpu::features::FeatureWords::of(&saved.cpuid).missing_from(&host);
            if !missing.is_empty() {
                return Err(VmError::IncompatibleCpu {
                    features: state.cpu_features,
                    missing,
                });
            }
        }
        let vcpu_fds = machine.take_vcpus();
        let mut cpuids = Vec::new();
        for (vcpu, saved) in vcpu_fds.iter().zip(state.vcpus.iter_mut()) {
            vcpu_state::advance_tsc(saved, gap);
            vcpu_state::restore(vcpu, saved)?;
            cpuids.push(
                CpuId::from_entries(&saved.cpuid)
                    .map_err(|_| VcpuStateError::TooManyEntries { index: saved.index })?,
            );
        }
        vm_state::restore(&machine.vm_fd, &state.vm)?;
        let cpus_us = started.elapsed().as_micros() as u64;
        let virtio = VirtioDevices::restore(
            &machine.vm_fd,
            &machine.ram.memory,
            &machine.buses.mmio,
            &state.virtio,
            &mut attached_taps,
            start_as == StartAs::Paused,
        )?;
        let taps_left: Vec<&str> = attached_taps.names().collect();
        if !taps_left.is_empty() {
            tracing::warn!(taps = ?taps_left, "TAPs attached ahead that no NIC of the VM uses: closed");
        }
        drop(attached_taps);
        let msr_indices = state.msr_indices.clone();
        let devices_us = started.elapsed().as_micros() as u64;
        let output = Machine::output_of(&config, &virtio);
        before_run(&output);
        let before_run_us = started.elapsed().as_micros() as u64;
        let vm = machine.start(
            config,
            started,
            vcpu_fds,
            cpuids,
            msr_indices,
            virtio,
            output,
            start_as,
        )?;
        // Each step's end, from the start of the restore: where a slow
        // promotion spends its time.
        tracing::info!(
            gap_ms = gap.as_millis() as u64,
            made_ahead,
            created_us,
            cpus_us,
            devices_us,
            before_run_us,
            restore_us = started.elapsed().as_micros() as u64,
            "guest restored"
        );
        Ok(vm)
    }

    /// Captures everything but memory; the vCPUs must be paused.
    pub fn capture_state(&self) -> Result<MachineState, VmError> {
        let vcpus = self.vcpus().with_paused(|index, fd| {
            vcpu_state::capture(
                fd,
                index,
                &self.cpuids[index as usize],
                &self.msr_indices,
                self.tsc_khz[index as usize],
            )
        })?;
        Ok(MachineState {
            version: snapshot::MACHINE_STATE_VERSION,
            captured_unix_ns: snapshot::unix_now_ns(),
            vcpu_count: self.config.vcpus,
            mem_mib: self.config.mem_mib,
            msr_indices: self.msr_indices.clone(),
            cpu_features: self.config.cpu_features,
            vcpus,
            vm: vm_state::capture(&self.vm_fd)?,
            serial: self.serial.lock().expect("serial lock").state(),
            virtio: self.virtio.state(),
        })
    }

    /// Pauses the guest, captures its state and memory into `dir`, resumes.
    pub fn capture_to_dir(&self, dir: &Path) -> Result<CaptureTimes, VmError> {
        std::fs::create_dir_all(dir).map_err(|source| snapshot::SnapshotError::File {
            path: dir.to_path_buf(),
            source,
        })?;
        let paused_at = Instant::now();
        let was_paused = self.vcpus.is_paused();
        let pause = self.pause();
        let result = (|| {
            let t = Instant::now();
            let state = self.capture_state()?;
            let state_time = t.elapsed();
            let memory_time = snapshot::write_memory(dir, &self.ram.memfd, self.ram.size)?;
            snapshot::write_state(dir, &state)?;
            Ok::<_, VmError>((state_time, memory_time))
        })();
        if !was_paused {
            self.resume();
        }
        let (state_time, memory_time) = result?;
        self.counters.record_capture();
        tracing::info!(
            dir = %dir.display(),
            pause_us = pause.as_micros() as u64,
            state_us = state_time.as_micros() as u64,
            memory_us = memory_time.as_micros() as u64,
            "captured"
        );
        Ok(CaptureTimes {
            pause_us: pause.as_micros() as u64,
            state_us: state_time.as_micros() as u64,
            memory_us: memory_time.as_micros() as u64,
            stopped_us: paused_at.elapsed().as_micros() as u64,
        })
    }

    /// Stops the guest for good (its vCPU threads end), as when it shuts
    /// down.
    pub fn stop(&self) {
        self.vcpus.stop();
    }

    /// How long since the VM was created (booted or restored).
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The running vCPUs (for pause and resume).
    pub(crate) fn vcpus(&self) -> &Vcpus {
        &self.vcpus
    }

    /// Pauses the guest and the device work outside the vCPUs (network
    /// receive): nothing writes guest memory until [`Vm::resume`]. Counted;
    /// returns how long stopping took.
    pub fn pause(&self) -> Duration {
        let start = Instant::now();
        self.vcpus.pause();
        self.virtio.pause();
        let took = start.elapsed();
        self.counters.record_pause(took);
        took
    }

    pub fn resume(&self) {
        self.virtio.resume();
        self.vcpus.resume();
    }

    /// How long the vCPU threads ran and waited for a CPU, summed over
    /// them, since they started (see [`crate::cpu::schedstat`]); None
    /// where the kernel does not tell.
    pub fn vcpu_cpu_times(&self) -> Option<crate::cpu::schedstat::CpuTimes> {
        self.vcpus.cpu_times()
    }

    /// How this VM's dirty pages are tracked.
    pub fn dirty_tracking(&self) -> DirtyMethod {
        self.dirty_log.method()
    }

    /// The pages written since the last harvest (the guest must be paused
    /// for the set to be exact).
    pub fn harvest_dirty(&self) -> Result<DirtyPages, VmError> {
        let start = Instant::now();
        let pages = self.dirty_log.harvest(&self.vm_fd, &self.ram.memory)?;
        self.counters.record_harvest(pages.count(), start.elapsed());
        Ok(pages)
    }

    /// Blocks until the guest resets, powers off or fails; stops the vCPUs.
    pub fn wait(&self) -> VmEvent {
        let event = self
            .events
            .lock()
            .expect("events lock")
            .recv()
            .unwrap_or(VmEvent::Shutdown);
        self.vcpus.stop();
        event
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.vcpus.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::disk_lock::tests::held_by_another_process;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_vm_whose_disk_another_process_holds_is_refused_before_its_ram_file_is_touched() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk0.img");
        std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
        // The RAM file of a copy of this VM still running here (its process
        // may be in the middle of handing it over).
        let ram_dir = dir.path().join("ram");
        std::fs::create_dir(&ram_dir).unwrap();
        std::fs::set_permissions(
            &ram_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let ram = ram_dir.join("vm.ram");
        std::fs::write(&ram, vec![0x5au8; 16 << 20]).unwrap();
        let inode = std::fs::metadata(&ram).unwrap().ino();
        let _holder = held_by_another_process(&disk);

        let config = VmConfig {
            vcpus: 1,
            mem_mib: 16,
            boot: BootSource {
                kernel: dir.path().join("no-kernel"),
                initrd: None,
                cmdline: String::new(),
            },
            serial: SerialSink::File(dir.path().join("console.log")),
            disks: vec![DiskConfig {
                path: disk.clone(),
                read_only: false,
                written_map: false,
            }],
            nets: Vec::new(),
            cpu_features: FeatureSet::X86_64V2,
            dirty_tracking: Default::default(),
            ram_file: Some(ram.clone()),
        };
        let error = Vm::boot(config)
            .err()
            .expect("refused while the disk is held");
        assert!(
            error.to_string().contains("in use by another process"),
            "{error}"
        );
        // The RAM file is the one that was there, as it was.
        let meta = std::fs::metadata(&ram).unwrap();
        assert_eq!(meta.ino(), inode, "the RAM file was replaced");
        let bytes = std::fs::read(&ram).unwrap();
        assert!(bytes.len() == 16 << 20 && bytes.iter().all(|&b| b == 0x5a));
    }
}
