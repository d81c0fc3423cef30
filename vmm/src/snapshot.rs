//! A whole VM captured to a directory, and continued from it by another
//! process: `state.json` (vCPUs, VM, devices; plain versioned data) and
//! `memory.bin` (guest RAM, saved separately).

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::cpu::state::VcpuStateError;
use crate::vm_state::VmStateError;

// The parts of a captured VM, as plain data.
pub use crate::cpu::features::FeatureSet;
pub use crate::cpu::state::VcpuState;
pub use crate::devices::serial::state::{SerialDeviceState, SERIAL_STATE_VERSION};
pub use crate::devices::virtio::{DeviceConfig, DeviceState, VirtioSlotState};
pub use crate::vm_state::VmState;

pub const MACHINE_STATE_VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory.bin";

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Vcpu(#[from] VcpuStateError),
    #[error(transparent)]
    Vm(#[from] VmStateError),
    #[error("snapshot file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("snapshot state {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("snapshot version {found} is not supported (this ftvmm reads version {MACHINE_STATE_VERSION})")]
    Version { found: u32 },
    #[error("memory file {path} holds {found} bytes, the snapshot says {expected}")]
    MemorySize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
}

/// Everything but memory.
#[derive(Serialize, Deserialize)]
pub struct MachineState {
    pub version: u32,
    /// Host wall-clock time of the capture (to advance guest time on restore).
    pub captured_unix_ns: u64,
    pub vcpu_count: u8,
    pub mem_mib: u64,
    /// The MSRs saved with each vCPU.
    pub msr_indices: Vec<u32>,
    /// The declared CPU feature set the VM was started with (the exact
    /// CPUID of each vCPU is in its state).
    pub cpu_features: crate::cpu::features::FeatureSet,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialDeviceState,
    /// virtio devices in MMIO slot order (disks, then NICs).
    pub virtio: Vec<VirtioSlotState>,
}

impl MachineState {
    /// Says when the capture was taken, on the clock of the host that will
    /// restore it: a snapshot that moved between hosts whose clocks differ
    /// would otherwise advance the guest's time by the gap plus the clocks'
    /// difference (the TSC and kvmclock are advanced by the gap on arrival).
    /// The kvmclock's own wall-clock stamp moves by the same amount.
    pub fn set_capture_time(&mut self, captured_unix_ns: u64) {
        let shift = captured_unix_ns as i128 - self.captured_unix_ns as i128;
        self.captured_unix_ns = captured_unix_ns;
        let realtime = self.vm.clock.realtime as i128 + shift;
        self.vm.clock.realtime = realtime.clamp(0, u64::MAX as i128) as u64;
    }

    /// The MAC of each NIC, in device order.
    pub fn nic_macs(&self) -> Vec<[u8; 6]> {
        self.virtio
            .iter()
            .filter_map(|slot| match &slot.config {
                DeviceConfig::Net(net) => Some(net.mac),
                DeviceConfig::Disk(_) => None,
            })
            .collect()
    }
}

/// How long each part of a capture took.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureTimes {
    pub pause_us: u64,
    pub state_us: u64,
    pub memory_us: u64,
    /// From pause to resume: what the guest lost.
    pub stopped_us: u64,
}

pub fn unix_now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes the state file (atomically: a temporary file renamed into place).
pub fn write_state(dir: &Path, state: &MachineState) -> Result<(), SnapshotError> {
    let path = dir.join(STATE_FILE);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let file = File::create(&tmp).map_err(file_err(&tmp))?;
    let mut out = BufWriter::new(file);
    serde_json::to_writer(&mut out, state).map_err(|source| SnapshotError::Parse {
        path: tmp.clone(),
        source,
    })?;
    out.flush().map_err(file_err(&tmp))?;
    out.get_ref().sync_all().map_err(file_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(file_err(&path))
}

/// Copies guest RAM (the memfd) to the memory file.
pub fn write_memory(dir: &Path, memfd: &File, size: u64) -> Result<Duration, SnapshotError> {
    let start = Instant::now();
    let path = dir.join(MEMORY_FILE);
    let mut out = File::create(&path).map_err(file_err(&path))?;
    let mut src = memfd.try_clone().map_err(file_err(&path))?;
    std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(0)).map_err(file_err(&path))?;
    let copied = std::io::copy(&mut std::io::Read::take(&mut src, size), &mut out)
        .map_err(file_err(&path))?;
    if copied != size {
        return Err(SnapshotError::MemorySize {
            path,
            found: copied,
            expected: size,
        });
    }
    out.sync_all().map_err(file_err(&path))?;
    Ok(start.elapsed())
}

pub fn read_state(dir: &Path) -> Result<MachineState, SnapshotError> {
    let path = dir.join(STATE_FILE);
    let bytes = std::fs::read(&path).map_err(file_err(&path))?;
    let state: MachineState =
        serde_json::from_slice(&bytes).map_err(|source| SnapshotError::Parse {
            path: path.clone(),
            source,
        })?;
    if state.version != MACHINE_STATE_VERSION {
        return Err(SnapshotError::Version {
            found: state.version,
        });
    }
    Ok(state)
}

/// Fills guest RAM (the memfd) from the memory file.
pub fn read_memory(dir: &Path, memfd: &File, size: u64) -> Result<(), SnapshotError> {
    let path = dir.join(MEMORY_FILE);
    let mut src = File::open(&path).map_err(file_err(&path))?;
    let found = src.metadata().map_err(file_err(&path))?.len();
    if found != size {
        return Err(SnapshotError::MemorySize {
            path,
            found,
            expected: size,
        });
    }
    let mut dst = memfd.try_clone().map_err(file_err(&path))?;
    std::io::Seek::seek(&mut dst, std::io::SeekFrom::Start(0)).map_err(file_err(&path))?;
    std::io::copy(&mut src, &mut dst).map_err(file_err(&path))?;
    Ok(())
}
