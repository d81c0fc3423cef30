//! The VMM's edge for replication: everything the FT engine needs from a
//! running VM, and nothing more. Device code knows nothing of it; the
//! engine reaches the VM only through these methods and types.
//!
//! - Stop and go: [`Vm::pause`] stops the vCPUs and device work outside
//!   them at one instant, [`Vm::resume`] lets them go (`vm.rs`).
//! - State: [`Vm::capture_state`] (everything but memory, as plain data).
//! - Memory: [`Vm::harvest_dirty_into`] copies the pages written since the
//!   last harvest (by the guest's CPUs or by the VMM's devices) into a
//!   [`PageSink`] the caller owns; [`Vm::stage_pages_where`] feeds an
//!   initial copy (the pages the standby does not hold).
//! - Output: [`Vm::output`], VM-wide control of the NICs' transmitted
//!   frames (hold, seal a batch, release through a batch, open), the
//!   guest's learned addresses and their announcement ([`Output`]).
//! - Input: [`Vm::input`], the frames the guest received, numbered per
//!   NIC, copied as they arrive while recording, and replayed into a
//!   promoted replica ([`Input`]).
//! - Disk writes: [`Vm::disk_writes`] records every disk write, taken per
//!   epoch ([`DiskWrites`]).
//! - Takeover: [`Vm::restore_replica`] continues a VM on replica RAM
//!   ([`ReplicaRam`]) with this node's own backings ([`Backings`]), its
//!   TAPs attached ahead where the standby did so ([`AttachedTaps`]).
//! - Pairing: [`offered_cpu_features`], the CPU feature words this host
//!   gives a guest of a declared feature set.
//! - CPU: [`Vm::vcpu_cpu_times`] (`vm.rs`), how long the vCPU threads ran
//!   and waited for a CPU ([`CpuTimes`]), and [`process_cpu_time`], what
//!   the whole process used: what the rest of the process (the engine
//!   among it) costs the guest where they share cores.

mod cpu;
mod disk_writes;
mod input;
mod output;
pub mod ram_label;
mod replica;

use std::ops::Range;
use std::path::PathBuf;

use vm_memory::{Bytes as _, GuestAddress};

pub use self::cpu::offered_cpu_features;
pub use self::disk_writes::{DiskWrite, DiskWrites, WritesThrough};
pub use self::input::{InboundFrame, Input};
pub use self::output::{gratuitous_arp, is_tcp, Announcer, Output};
pub use self::replica::{Backings, ReplicaRam};
pub use crate::cpu::schedstat::{process_cpu_time, CpuTimes};
pub use crate::devices::virtio::block::disk_lock;
pub use crate::devices::virtio::block::written_map;
/// The longest frame (virtio header included) a NIC delivers or replays.
pub use crate::devices::virtio::net::queues::MAX_FRAME_LEN as MAX_RECEIVED_FRAME_LEN;
/// TAPs a standby attaches while it stands by, for its promotion.
pub use crate::devices::virtio::net::tap::{AttachedTaps, TapError};
pub use crate::devices::virtio::net::tx_gate::MAX_HELD_BYTES;
use crate::memory::GuestMemoryMmap;
pub use crate::memory::PAGE_SIZE;
use crate::vm::{Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("harvesting the dirty pages failed: {0}")]
    Harvest(#[source] Box<VmError>),
    #[error("copying guest page {gpa:#x} failed: {source}")]
    CopyPage {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("creating the replica's memory ({mib} MiB) failed: {source}")]
    ReplicaMemory {
        mib: u64,
        #[source]
        source: crate::memory::MemoryError,
    },
    #[error("writing replica page {gpa:#x} ({len} bytes) failed: {reason}")]
    WritePage {
        gpa: u64,
        len: usize,
        reason: String,
    },
    #[error("reading replica page {gpa:#x} failed: {source}")]
    ReadPage {
        gpa: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("the checkpoint has {checkpoint} {what}, this node gave {local}")]
    BackingCount {
        what: &'static str,
        checkpoint: usize,
        local: usize,
    },
    #[error("the replica cannot run: {0}")]
    Restore(#[source] Box<VmError>),
    #[error("probing this host's KVM for its CPU features failed: {0}")]
    Host(String),
    #[error("labelling the RAM file {path} failed: {source}")]
    LabelMemory {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} no longer holds this VM's memory (replaced while the VM ran): not labelled")]
    LabelMemoryElsewhere { path: PathBuf },
}

/// Where a harvest or a copy puts pages: for each page the sink hands out
/// the buffer its bytes go to (after whatever record header the sink
/// writes for `gpa`); exactly [`PAGE_SIZE`] bytes are appended to it.
pub trait PageSink {
    fn page_buffer(&mut self, gpa: u64) -> &mut Vec<u8>;
}

impl Vm {
    /// Copies every page written since the last harvest into `sink`, in
    /// address order; returns how many. The guest must be paused for the
    /// set to be exact.
    pub fn harvest_dirty_into(&self, sink: &mut impl PageSink) -> Result<u64, ReplicationError> {
        let dirty = self
            .harvest_dirty()
            .map_err(|e| ReplicationError::Harvest(Box::new(e)))?;
        self.stage_pages(dirty.page_numbers(), sink)
    }

    /// Forgets the pages written so far: from here on, a harvest reports
    /// only what is written after this call.
    pub fn clear_dirty(&self) -> Result<(), ReplicationError> {
        self.harvest_dirty()
            .map(|_| ())
            .map_err(|e| ReplicationError::Harvest(Box::new(e)))
    }

    /// Copies the pages numbered `pages` (in the order given) into
    /// `sink`; returns how many.
    pub fn stage_listed_pages(
        &self,
        pages: impl IntoIterator<Item = u64>,
        sink: &mut impl PageSink,
    ) -> Result<u64, ReplicationError> {
        self.stage_pages(pages, sink)
    }

    fn stage_pages(
        &self,
        pages: impl IntoIterator<Item = u64>,
        sink: &mut impl PageSink,
    ) -> Result<u64, ReplicationError> {
        copy_pages(&self.ram.memory, pages, sink)
    }

    /// Copies the pages numbered `range` that `wanted` (page number,
    /// contents) picks into `sink`; returns how many.
    pub fn stage_pages_where(
        &self,
        range: Range<u64>,
        sink: &mut impl PageSink,
        mut wanted: impl FnMut(u64, &[u8]) -> bool,
    ) -> Result<u64, ReplicationError> {
        let mut page = [0u8; PAGE_SIZE];
        let mut count = 0;
        for n in range {
            let gpa = n * PAGE_SIZE as u64;
            self.ram
                .memory
                .read_slice(&mut page, GuestAddress(gpa))
                .map_err(|source| ReplicationError::CopyPage { gpa, source })?;
            if wanted(n, &page) {
                sink.page_buffer(gpa).extend_from_slice(&page);
                count += 1;
            }
        }
        Ok(count)
    }

    /// Labels the RAM file at `path` with what its memory holds now
    /// ([`ram_label`]): only if this VM's memory is that very file (the
    /// label's owner is the file the guest ran on either way). The caller
    /// vouches that the guest does not run again on this memory.
    pub fn label_memory(
        &self,
        path: &std::path::Path,
        label: &[u8],
    ) -> Result<(), ReplicationError> {
        let failed = |source| ReplicationError::LabelMemory {
            path: path.to_path_buf(),
            source,
        };
        if !crate::memory::is_at(&self.ram.memfd, path).map_err(failed)? {
            return Err(ReplicationError::LabelMemoryElsewhere {
                path: path.to_path_buf(),
            });
        }
        let (file, _) = ram_label::RamLabel::take(path, &self.ram.memfd).map_err(failed)?;
        file.set(label).map_err(failed)
    }

    /// Reads guest memory at `gpa` into `buf` (for checks made while the
    /// guest is paused).
    pub fn read_memory(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReplicationError> {
        self.ram
            .memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| ReplicationError::ReadPage { gpa, source })
    }

    /// Guest RAM in bytes.
    pub fn guest_bytes(&self) -> u64 {
        self.ram.size
    }

    /// Guest RAM in pages.
    pub fn guest_pages(&self) -> u64 {
        self.ram.size / PAGE_SIZE as u64
    }

    /// What the VM was booted from and with (its boot source, vCPUs and
    /// NICs: what a mirror needs to boot it elsewhere).
    pub fn config(&self) -> &crate::vm::VmConfig {
        &self.config
    }

    /// Guest RAM in MiB.
    pub fn mem_mib(&self) -> u64 {
        self.config.mem_mib
    }

    /// The disks' backing files, in device order.
    pub fn disk_paths(&self) -> Vec<PathBuf> {
        self.config.disks.iter().map(|d| d.path.clone()).collect()
    }

    /// The TAPs of the NICs, in device order.
    pub fn taps(&self) -> Vec<String> {
        self.config.nets.iter().map(|n| n.tap.clone()).collect()
    }

    /// The guest's network output, VM-wide.
    pub fn output(&self) -> &Output {
        &self.output
    }

    /// The guest's network input, VM-wide.
    pub fn input(&self) -> &Input {
        &self.input
    }

    /// The record of the guest's disk writes, VM-wide.
    pub fn disk_writes(&self) -> &DiskWrites {
        &self.disk_writes
    }
}

/// Copies pages (by number) of `mem` into `sink`, in the given order:
/// the one copy loop of a checkpoint.
fn copy_pages(
    mem: &GuestMemoryMmap,
    pages: impl IntoIterator<Item = u64>,
    sink: &mut impl PageSink,
) -> Result<u64, ReplicationError> {
    let mut count = 0;
    for page in pages {
        let gpa = page * PAGE_SIZE as u64;
        let buf = sink.page_buffer(gpa);
        mem.write_all_volatile_to(GuestAddress(gpa), buf, PAGE_SIZE)
            .map_err(|source| ReplicationError::CopyPage { gpa, source })?;
        count += 1;
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sink that keeps (gpa, first byte) per page.
    #[derive(Default)]
    struct Firsts {
        buf: Vec<u8>,
        gpas: Vec<u64>,
    }

    impl PageSink for Firsts {
        fn page_buffer(&mut self, gpa: u64) -> &mut Vec<u8> {
            self.gpas.push(gpa);
            &mut self.buf
        }
    }

    #[test]
    fn replica_ram_checks_page_writes() {
        let ram = ReplicaRam::create(16).unwrap();
        assert_eq!(ram.bytes(), 16 << 20);
        ram.write_page(4096, &[7u8; PAGE_SIZE]).unwrap();
        let mut back = [0u8; PAGE_SIZE];
        ram.read_page(4096, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 7));
        assert!(ram.write_page(16 << 20, &[1u8; PAGE_SIZE]).is_err());
        assert!(ram.write_page(4096, &[1u8; 100]).is_err());
        // A sink is just a buffer provider.
        let mut sink = Firsts::default();
        sink.page_buffer(0).push(1);
        assert_eq!(sink.gpas, vec![0]);
    }
}
