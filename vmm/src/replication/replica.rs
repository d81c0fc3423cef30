//! A standby's replica: guest RAM that receives a primary's pages, the KVM
//! VM it will run in (made ahead, while the standby stands by), and the
//! restore that continues the VM on it (no copy of memory) with this
//! node's own disk files and TAPs.

use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Instant;

use vm_memory::{Bytes as _, GuestAddress};

use super::ram_label::{self, RamLabel};
use super::{Output, ReplicationError, PAGE_SIZE};
use crate::devices::virtio::net::tap::AttachedTaps;
use crate::devices::virtio::DeviceConfig;
use crate::dirty::DirtyTracking;
use crate::memory::{self, GuestRam};
use crate::snapshot::MachineState;
use crate::vm::{MadeAhead, SerialSink, StartAs, Vm, VmError, VmShell};

/// The replica's guest RAM (a memfd, zeroed when created, or a RAM file
/// that may hold an earlier copy's memory), and the KVM VM
/// being made for it ahead of a promotion.
pub struct ReplicaRam {
    vm: Option<JoinHandle<Result<VmShell, VmError>>>,
    ram: GuestRam,
    /// The label beside a RAM file ([`RamLabel`]), and what it said when
    /// the file was opened (only for a kept file).
    label: Option<RamLabel>,
    taken_label: Option<Vec<u8>>,
}

impl ReplicaRam {
    pub fn create(mem_mib: u64) -> Result<ReplicaRam, ReplicationError> {
        let ram = memory::create(mem_mib).map_err(|source| ReplicationError::ReplicaMemory {
            mib: mem_mib,
            source,
        })?;
        Ok(ReplicaRam {
            vm: None,
            ram,
            label: None,
            taken_label: None,
        })
    }

    /// The replica's RAM in the file at `path` ([`memory::open_file`]):
    /// what an earlier copy of the VM on this node left there is kept when
    /// the file fits (returns true: compare it before trusting any of it,
    /// or trust its label, [`ReplicaRam::taken_label`]).
    pub fn open_file(
        path: &std::path::Path,
        mem_mib: u64,
    ) -> Result<(ReplicaRam, bool), ReplicationError> {
        let (ram, kept) = memory::open_file(path, mem_mib, true).map_err(|source| {
            ReplicationError::ReplicaMemory {
                mib: mem_mib,
                source,
            }
        })?;
        // Taken after the file's lock: no other holder writes it now.
        let (label, taken_label) = match RamLabel::take(path, &ram.memfd) {
            Ok((label, said)) => (Some(label), said.filter(|_| kept)),
            Err(error) => {
                tracing::warn!(
                    path = %ram_label::label_path(path).display(),
                    %error,
                    "the RAM file's label cannot be used: kept memory is compared page by page"
                );
                (None, None)
            }
        };
        Ok((
            ReplicaRam {
                vm: None,
                ram,
                label,
                taken_label,
            },
            kept,
        ))
    }

    /// What the RAM file's label said when it was opened (kept files
    /// only; the label is cleared by then).
    pub fn taken_label(&self) -> Option<&[u8]> {
        self.taken_label.as_deref()
    }

    /// Labels the RAM file's memory as it is now (its owner vouches that
    /// every later write to it is one the label's reader learns of).
    /// Without a RAM file, nothing.
    pub fn set_label(&self, label: &[u8]) -> std::io::Result<()> {
        match &self.label {
            Some(l) => l.set(label),
            None => Ok(()),
        }
    }

    /// Clears the RAM file's label.
    pub fn clear_label(&self) -> std::io::Result<()> {
        match &self.label {
            Some(l) => l.clear(),
            None => Ok(()),
        }
    }

    /// Starts making, on a thread of its own, the KVM VM this RAM would
    /// run in with `vcpus` vCPUs (the slow half of a promotion: about 185
    /// ms of a 290 ms restore on a lab node), so that a promotion finds it
    /// made. Once is enough: later calls do nothing.
    pub fn prepare_vm(&mut self, vcpus: u8) {
        if self.vm.is_some() {
            return;
        }
        let memory = self.ram.memory.clone();
        let mem_mib = self.ram.size >> 20;
        let made = std::thread::Builder::new()
            .name("ft-vm-ahead".into())
            .spawn(move || {
                let started = Instant::now();
                let shell = VmShell::create(&memory, mem_mib, vcpus, DirtyTracking::default());
                match &shell {
                    Ok(_) => tracing::info!(
                        vcpus,
                        took_us = started.elapsed().as_micros() as u64,
                        "the VM a promotion needs is made"
                    ),
                    Err(error) => tracing::warn!(
                        %error,
                        "making the VM ahead failed: a promotion will make it"
                    ),
                }
                shell
            });
        match made {
            Ok(handle) => self.vm = Some(handle),
            Err(error) => {
                tracing::warn!(%error, "could not start the thread that makes the VM ahead")
            }
        }
    }

    /// The VM made ahead, waiting for it if it is still being made; None
    /// if none was asked for or making it failed.
    fn take_vm(&mut self) -> Option<VmShell> {
        self.vm.take()?.join().ok()?.ok()
    }

    /// Its size in bytes.
    pub fn bytes(&self) -> u64 {
        self.ram.size
    }

    /// Writes one whole page at `gpa` (page aligned, inside the RAM).
    pub fn write_page(&self, gpa: u64, data: &[u8]) -> Result<(), ReplicationError> {
        let refuse = |reason: String| ReplicationError::WritePage {
            gpa,
            len: data.len(),
            reason,
        };
        if data.len() != PAGE_SIZE || !gpa.is_multiple_of(PAGE_SIZE as u64) {
            return Err(refuse("not one aligned page".into()));
        }
        match gpa.checked_add(PAGE_SIZE as u64) {
            Some(end) if end <= self.ram.size => {}
            _ => return Err(refuse(format!("outside {} bytes of RAM", self.ram.size))),
        }
        self.ram
            .memory
            .write_slice(data, GuestAddress(gpa))
            .map_err(|e| refuse(e.to_string()))
    }

    /// Copies pages (by number) of this RAM into `sink` with the copy loop
    /// a checkpoint uses (for benchmarks without a guest).
    pub fn stage_pages(
        &self,
        pages: impl IntoIterator<Item = u64>,
        sink: &mut impl super::PageSink,
    ) -> Result<u64, ReplicationError> {
        super::copy_pages(&self.ram.memory, pages, sink)
    }

    /// Reads the page at `gpa` into `buf`.
    pub fn read_page(&self, gpa: u64, buf: &mut [u8]) -> Result<(), ReplicationError> {
        self.ram
            .memory
            .read_slice(buf, GuestAddress(gpa))
            .map_err(|source| ReplicationError::ReadPage { gpa, source })
    }
}

/// What a promoted replica runs on, on this node: the guest console, the
/// replica's disk files and this node's TAPs, in device order.
#[derive(Debug)]
pub struct Backings {
    pub serial: SerialSink,
    pub disks: Vec<PathBuf>,
    pub taps: Vec<String>,
    /// Of `taps`, those this node attached while standing by
    /// ([`AttachedTaps::attach`]): the NICs take them as they are.
    pub attached_taps: AttachedTaps,
}

impl Vm {
    /// Continues the VM of `state` on `ram` as it is (no copy of memory),
    /// its disks and NICs backed by `backings` (counts must match the
    /// checkpoint's devices); guest time advances by the real gap since
    /// the checkpoint. `before_run` is called when the TAPs exist and
    /// before the vCPUs start, with the VM's output: what the guest's first
    /// frames need on this node (its TAPs up on the bridge, the guest
    /// announced there) is done there, so that the frames an overdue timer
    /// sends at once, and those its peers send, are not lost. The VM comes back with
    /// its vCPUs parked: the caller sends what must leave first (the
    /// announcement, the output it hands over), then calls [`Vm::resume`].
    pub fn restore_replica(
        mut state: MachineState,
        ram: ReplicaRam,
        backings: Backings,
        before_run: impl FnOnce(&Output),
    ) -> Result<Vm, ReplicationError> {
        let started = Instant::now();
        let configs = state
            .virtio
            .iter_mut()
            .map(|slot| &mut slot.config)
            .collect();
        bind_backings(configs, backings.disks, backings.taps)?;
        let mut ram = ram;
        // The memory runs as a guest from here on: it no longer is what
        // any label says.
        if let Err(error) = ram.clear_label() {
            tracing::warn!(%error, "the RAM file's label could not be cleared");
        }
        let ahead = MadeAhead {
            shell: ram.take_vm(),
            taps: backings.attached_taps,
        };
        Vm::restore_from(
            state,
            ram.ram,
            ahead,
            backings.serial,
            started,
            before_run,
            StartAs::Paused,
        )
        .map_err(|e| ReplicationError::Restore(Box::new(e)))
    }
}

/// Points the checkpoint's devices (in slot order) at this node's disk
/// files and TAPs. The device list comes from the peer: its counts must
/// match this node's, or the replica is refused (never indexed past).
fn bind_backings(
    configs: Vec<&mut DeviceConfig>,
    disks: Vec<PathBuf>,
    taps: Vec<String>,
) -> Result<(), ReplicationError> {
    let in_checkpoint = |disk: bool| {
        configs
            .iter()
            .filter(|c| matches!(c, DeviceConfig::Disk(_)) == disk)
            .count()
    };
    for (what, checkpoint, local) in [
        ("disks", in_checkpoint(true), disks.len()),
        ("NICs", in_checkpoint(false), taps.len()),
    ] {
        if checkpoint != local {
            return Err(ReplicationError::BackingCount {
                what,
                checkpoint,
                local,
            });
        }
    }
    let (mut disks, mut taps) = (disks.into_iter(), taps.into_iter());
    for config in configs {
        match config {
            DeviceConfig::Disk(disk) => disk.path = disks.next().expect("counted"),
            DeviceConfig::Net(net) => net.tap = taps.next().expect("counted"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::DiskConfig;
    use crate::devices::virtio::net::NetConfig;

    fn devices() -> Vec<DeviceConfig> {
        let disk = |p: &str| {
            DeviceConfig::Disk(DiskConfig {
                path: p.into(),
                read_only: false,
                written_map: false,
            })
        };
        let nic = DeviceConfig::Net(NetConfig {
            tap: "primary-tap".into(),
            mac: [2, 0, 0, 0, 0, 1],
        });
        vec![disk("/primary/a.img"), disk("/primary/b.img"), nic]
    }

    /// A checkpoint naming more devices than this node has (peer data) is
    /// refused with the counts; before, promotion indexed this node's list
    /// by the checkpoint's and panicked past its end.
    #[test]
    fn a_checkpoint_with_other_device_counts_is_refused_not_indexed_past() {
        let mut configs = devices();
        let err = bind_backings(
            configs.iter_mut().collect(),
            vec!["/replica/a.img".into()],
            vec!["tap0".into()],
        )
        .unwrap_err();
        assert!(
            matches!(
                err,
                ReplicationError::BackingCount {
                    what: "disks",
                    checkpoint: 2,
                    local: 1
                }
            ),
            "{err}"
        );
        let mut configs = devices();
        let err = bind_backings(
            configs.iter_mut().collect(),
            vec!["/replica/a.img".into(), "/replica/b.img".into()],
            vec![],
        )
        .unwrap_err();
        assert!(
            matches!(err, ReplicationError::BackingCount { what: "NICs", .. }),
            "{err}"
        );
        assert_eq!(configs, devices(), "nothing rebound on a refusal");
    }

    #[test]
    fn matching_devices_are_bound_to_this_nodes_files_and_taps_in_order() {
        let mut configs = devices();
        bind_backings(
            configs.iter_mut().collect(),
            vec!["/replica/a.img".into(), "/replica/b.img".into()],
            vec!["tap0".into()],
        )
        .unwrap();
        let bound: Vec<String> = configs
            .iter()
            .map(|c| match c {
                DeviceConfig::Disk(d) => d.path.display().to_string(),
                DeviceConfig::Net(n) => n.tap.clone(),
            })
            .collect();
        assert_eq!(bound, ["/replica/a.img", "/replica/b.img", "tap0"]);
    }
}
