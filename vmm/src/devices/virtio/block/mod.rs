//! virtio-blk backed by a raw image file: read, write, flush (fdatasync),
//! get-id; optionally read-only. Requests run synchronously in the vCPU
//! thread that notifies the queue; a synchronous mirror of the disk holds
//! their completion until the peer has the batch's writes (see
//! [`write_log`]).

pub mod disk_lock;
pub mod request;
pub mod state;
pub mod write_log;
pub mod written_map;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueState, QueueT};

use crate::memory::GuestMemoryMmap;

use self::request::{Disk, SECTOR_SIZE};
use self::state::{BlockState, BLOCK_STATE_VERSION};
use self::write_log::WriteLog;
use self::written_map::WrittenMap;
use super::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, INTERRUPT_USED_BUFFER,
    VIRTIO_F_VERSION_1,
};

/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];
/// Data segments per request the driver may use (the header and the status
/// take two descriptors).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read the size of disk image {path}: {source}")]
    Size {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("disk image {path} is smaller than one sector")]
    Empty { path: PathBuf },
    #[error("block state version {found} is not supported (expected {BLOCK_STATE_VERSION})")]
    StateVersion { found: u32 },
    #[error("disk image {path} has {found} sectors, the saved device had {saved}")]
    CapacityChanged {
        path: PathBuf,
        found: u64,
        saved: u64,
    },
    #[error("disk image {path}: {source}")]
    WrittenMap {
        path: PathBuf,
        #[source]
        source: written_map::WrittenMapError,
    },
    #[error(transparent)]
    Lock(#[from] disk_lock::DiskLockError),
}

/// A disk of the VM: `PATH` or `PATH,ro` on the command line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    /// Keep a written map beside the image ([`written_map`]; not for a
    /// read-only disk).
    #[serde(default)]
    pub written_map: bool,
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (path, read_only) = match s.rsplit_once(',') {
            Some((path, "ro")) => (path, true),
            Some((path, "rw")) => (path, false),
            Some((_, other)) => {
                return Err(format!("unknown disk option {other:?} (expected ro or rw)"))
            }
            None => (s, false),
        };
        if path.is_empty() {
            return Err("empty disk path".into());
        }
        Ok(DiskConfig {
            path: PathBuf::from(path),
            read_only,
            written_map: false,
        })
    }
}

/// The request queue while the driver has the device running.
struct ActiveQueue {
    mem: GuestMemoryMmap,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
}

/// Counters of the requests the device completed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BlockCounters {
    pub completed: u64,
    pub failed: u64,
}

pub struct Block {
    config: DiskConfig,
    file: File,
    capacity_sectors: u64,
    id: [u8; VIRTIO_BLK_ID_BYTES as usize],
    active: Option<ActiveQueue>,
    write_log: Arc<WriteLog>,
    pub counters: BlockCounters,
    /// A disk written is locked against other processes ([`disk_lock`]).
    _lock: Option<disk_lock::DiskLock>,
}

/// Locks the writable disks among `disks` against other processes
/// ([`disk_lock`]), as [`Block::open`] does, for a caller that must know
/// them its own before it touches anything else of the VM (a booting VM,
/// before it replaces its RAM file). The disks' [`Block`]s share these
/// holds.
pub fn lock_disks(disks: &[DiskConfig]) -> Result<Vec<disk_lock::DiskLock>, BlockError> {
    let mut locks = Vec::new();
    for disk in disks.iter().filter(|d| !d.read_only) {
        locks.extend(open_locked(disk)?.1);
    }
    Ok(locks)
}

/// Opens a disk image (read-write unless `read_only`) and, when it is
/// writable, locks it against other processes ([`disk_lock`]) before
/// anything reads or writes it.
fn open_locked(config: &DiskConfig) -> Result<(File, Option<disk_lock::DiskLock>), BlockError> {
    let file = OpenOptions::new()
        .read(true)
        .write(!config.read_only)
        .open(&config.path)
        .map_err(|source| BlockError::Open {
            path: config.path.clone(),
            source,
        })?;
    let lock = if config.read_only {
        None
    } else {
        Some(disk_lock::DiskLock::acquire(
            &config.path,
            &file,
            disk_lock::DISK_LOCK_WAIT,
        )?)
    };
    Ok((file, lock))
}

impl Block {
    /// Opens the disk image (read-write unless `read_only`).
    pub fn open(config: &DiskConfig) -> Result<Block, BlockError> {
        let path = config.path.clone();
        let (file, lock) = open_locked(config)?;
        let bytes = file
            .metadata()
            .map_err(|source| BlockError::Size {
                path: path.clone(),
                source,
            })?
            .len();
        let capacity_sectors = bytes / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::Empty { path });
        }
        // The serial the guest sees (/sys/block/vdX/serial): the file name.
        let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let n = name.len().min(id.len());
        id[..n].copy_from_slice(&name.as_bytes()[..n]);
        let write_log = Arc::new(WriteLog::default());
        let map_err = |source| BlockError::WrittenMap {
            path: path.clone(),
            source,
        };
        if config.written_map && !config.read_only {
            let map = WrittenMap::open_beside(&path, bytes).map_err(map_err)?;
            write_log.note_writes_in(Arc::new(map));
        } else if !config.read_only && WrittenMap::path_for(&path).exists() {
            // Written without its map, the disk no longer matches what a
            // map beside it says: that map names no common point any more.
            WrittenMap::open_beside(&path, bytes)
                .and_then(|map| map.set_common(None, u64::MAX))
                .map_err(map_err)?;
        }
        Ok(Block {
            config: config.clone(),
            file,
            capacity_sectors,
            id,
            active: None,
            write_log,
            counters: BlockCounters::default(),
            _lock: lock,
        })
    }

    /// Opens the disk for a device restored from `state`; the image must
    /// have the saved size.
    pub fn from_state(config: &DiskConfig, state: &BlockState) -> Result<Block, BlockError> {
        if state.version != BLOCK_STATE_VERSION {
            return Err(BlockError::StateVersion {
                found: state.version,
            });
        }
        let block = Block::open(&DiskConfig {
            path: config.path.clone(),
            read_only: state.read_only,
            written_map: config.written_map,
        })?;
        if block.capacity_sectors != state.capacity_sectors {
            return Err(BlockError::CapacityChanged {
                path: config.path.clone(),
                found: block.capacity_sectors,
                saved: state.capacity_sectors,
            });
        }
        Ok(block)
    }

    pub fn state(&self) -> BlockState {
        BlockState {
            version: BLOCK_STATE_VERSION,
            read_only: self.config.read_only,
            capacity_sectors: self.capacity_sectors,
        }
    }

    /// The record of this disk's writes (off until started).
    pub fn write_log(&self) -> Arc<WriteLog> {
        Arc::clone(&self.write_log)
    }

    /// The configuration space: capacity, size_max (unused), seg_max.
    fn config_space(&self) -> [u8; 16] {
        let mut space = [0u8; 16];
        space[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        space[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        space
    }

    /// Completes every available request.
    fn process_queue(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let disk = Disk {
            file: &self.file,
            capacity_sectors: self.capacity_sectors,
            read_only: self.config.read_only,
            id: &self.id,
            log: Some(&self.write_log),
        };
        let mut done = Vec::new();
        while let Some(chain) = active.queue.pop_descriptor_chain(&active.mem) {
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            let used_len = match request::execute(&active.mem, &descriptors, &disk) {
                Ok(completion) => {
                    if completion.status == 0 {
                        self.counters.completed += 1;
                    } else {
                        self.counters.failed += 1;
                    }
                    completion.used_len
                }
                Err(_) => {
                    self.counters.failed += 1;
                    0
                }
            };
            done.push((head, used_len));
        }
        // A synchronous mirror holds the batch's completions until the
        // peer has its writes (at once otherwise).
        if !done.is_empty() {
            self.write_log.wait_settled();
        }
        let mut used = false;
        for (head, used_len) in done {
            // A used ring outside guest memory was refused at activation.
            if active.queue.add_used(&active.mem, head, used_len).is_ok() {
                used = true;
            }
        }
        if used && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            // A failed eventfd write leaves the guest to time out the request.
            let _ = active.interrupt.trigger(INTERRUPT_USED_BUFFER);
        }
    }
}

impl VirtioDevice for Block {
    fn device_state(&self) -> super::DeviceState {
        super::DeviceState::Block(self.state())
    }

    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1 | 1 << VIRTIO_BLK_F_FLUSH | 1 << VIRTIO_BLK_F_SEG_MAX;
        if self.config.read_only {
            features |= 1 << VIRTIO_BLK_F_RO;
        }
        features
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let space = self.config_space();
        let start = offset as usize;
        match space.get(start..start + data.len()) {
            Some(bytes) => data.copy_from_slice(bytes),
            None => data.fill(0),
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in the block configuration is writable (no WCE feature).
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let got = activation.queues.len();
        let queue = activation
            .queues
            .into_iter()
            .next()
            .filter(|_| got == 1)
            .ok_or(ActivateError::QueueCount { expected: 1, got })?;
        self.active = Some(ActiveQueue {
            mem: activation.mem,
            queue,
            interrupt: activation.interrupt,
        });
        Ok(())
    }

    fn queue_notify(&mut self, queue_index: u16) {
        if queue_index == 0 {
            self.process_queue();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Option<Vec<QueueState>> {
        self.active.as_ref().map(|a| vec![a.queue.state()])
    }
}

#[cfg(test)]
mod tests;
