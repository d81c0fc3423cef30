//! Initial synchronisation of a new standby while the guest runs: the plan
//! (with a fresh content key), the standby's word on what it holds of each
//! disk ([`crate::content`]), disk writes recorded from then on, the disks
//! copied (only the chunks the standby does not hold: all-zero ones for a
//! new file, those whose digest differs for a kept one), then memory
//! (non-zero pages, or against kept memory the pages whose digest differs
//! from the one this node made while the standby made its own; then
//! pre-copy rounds of the pages dirtied meanwhile).
//! Whatever the copy misses is in the first epoch. Pages and disk chunks
//! go zstd-compressed unless the level is 0 ([`crate::protocol::compressed`]).

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use ft_link::LinkSender;
use tokio::sync::mpsc;
use tracing::info;
use vmm::replication::written_map::{extents_of, Extents};
use vmm::replication::ReplicationError;
use vmm::vm::Vm;

use super::history::{Line, MemoryHistory, PageSet};
use super::{send_all, PrimaryConfig, PrimaryError};
use crate::content::{
    disk_chunks, missing_ranges, ChunkDigest, ContentKey, Holding, MappedChunk, DISK_CHUNK,
};
use crate::level::Level;
use crate::protocol::compressed::Compressor;
use crate::protocol::{
    disk_payloads, BootPlan, DiskRecord, EndTally, Held, HeldPart, Message, PageStager, Region,
    SyncPlan, DISK_BYTES_PER_FRAME, PAGE_SIZE,
};
use crate::status::{FtState, Role, StatusBoard, SyncProgress};

/// Memory is scanned this many pages at a time between sends.
const SCAN_PAGES: u64 = 1024;
/// The guest's disk writes recorded during the copy are sent once they
/// hold this much (they are sent in order, after whatever copy they may
/// overlap, so the standby ends with the newest bytes), and all of them
/// at the end of the copy: the record's memory stays bounded however long
/// the copy takes, and the first epoch carries only what came after.
const DRAIN_WRITES_AT: u64 = 8 << 20;
/// A pre-copy round this small ends the rounds.
const SMALL_ROUND: u64 = 256;

pub(super) async fn initial_sync(
    vm: &Arc<Vm>,
    (tx, mut held): (&LinkSender, mpsc::UnboundedReceiver<Held>),
    config: &PrimaryConfig,
    status: &StatusBoard,
    (generation, level): (u64, Level),
    (forgetter, history): (&super::forget::Forgetter, &MemoryHistory),
) -> Result<u64, PrimaryError> {
    let started = Instant::now();
    status.set_state(Role::Primary, FtState::Syncing, None);
    let key = ContentKey::random().map_err(PrimaryError::ContentKey)?;
    let disks = vm.disk_paths();
    let mut disk_bytes = Vec::new();
    for path in &disks {
        let size = std::fs::metadata(path)
            .map_err(|source| PrimaryError::ReadDisk {
                path: path.clone(),
                source,
            })?
            .len();
        disk_bytes.push(size);
    }
    let ha = level == Level::Ha;
    let (written, next_common) = forgetter.plan();
    // Level FT: a new memory lineage, the line before it what a standby
    // labelled with one of its checkpoints is brought forward from.
    // Level HA copies no memory and leaves the line alone.
    let (lineage, earlier) = if ha {
        (None, None)
    } else {
        let lineage = crate::written::random_common().map_err(PrimaryError::MemoryLineage)?;
        (Some(lineage), history.begin(lineage))
    };
    let offered = earlier.as_ref().filter(|line| line.since().is_some());
    // The extents the primary's maps name now (for the disks whose map
    // names a common point): a standby that says a chunk of them is the
    // same by the maps, or says so of another disk, is wrong.
    let own_written: Vec<Option<Vec<Extents>>> = written
        .iter()
        .zip(&disk_bytes)
        .map(|(plan, &size)| {
            plan.as_ref()
                .filter(|p| p.common.is_some())
                .and_then(|p| crate::written::plan_extents(p, extents_of(size)))
        })
        .collect();
    let plan = SyncPlan {
        version: crate::protocol::SYNC_PLAN_VERSION,
        mem_mib: vm.mem_mib(),
        disk_bytes: disk_bytes.clone(),
        nics: vm.output().nics(),
        content_key: key.to_hex(),
        level,
        boot: ha.then(|| boot_plan(vm)),
        written,
        next_common: Some(next_common),
        memory_lineage: lineage.map(crate::written::common_to_hex),
        memory_since: offered.and_then(Line::since),
    };
    let sent_before = status.snapshot().counters.alink_bytes_sent;
    tx.send(&Message::SyncBegin(Box::new(plan)).into_frame(0, generation))
        .await?;
    let progress = Progress {
        vm,
        started: Instant::now(),
        tally: Default::default(),
        compressor: std::sync::Mutex::new(Compressor::new(config.copy_compression)),
        copied_bytes: Default::default(),
        disk_bytes: Default::default(),
        status,
        generation,
        total: disk_bytes.iter().sum::<u64>()
            + if ha {
                0
            } else {
                vm.guest_pages() * PAGE_SIZE as u64
            },
    };
    // A standby that kept its disks or memory reads them all first.
    progress.report("standby comparing what it kept", 0);
    // Level HA copies no memory, and the standby says nothing of it.
    let pages = (!ha).then(|| vm.guest_pages());
    // The pages written since the line's last checkpoint (nothing
    // harvests between sessions); the log starts afresh for the copy.
    let dirtied = match pages {
        Some(_) => {
            let dirty = vm.harvest_dirty().map_err(|e| PrimaryError::Stage {
                epoch: 0,
                source: ReplicationError::Harvest(Box::new(e)),
            })?;
            offered.map(|_| dirty.page_numbers().collect::<Vec<u64>>())
        }
        None => None,
    };
    // Meanwhile this node digests its own memory under the same key.
    let own = pages.map(|_| OwnDigests::start(vm, key));
    let mut held = receive_holdings(&mut held, &disk_bytes, (pages, offered), own.as_ref()).await?;
    // A new standby holds zeros: its digests are not needed (dropped, the
    // digesting stops).
    let own = own.filter(|_| matches!(held.memory, Some(Holding::Kept(_))));
    check_mapped(&held.disks, &disk_bytes, &own_written)?;
    // Record from before the copy: every write the copy might miss is
    // replayed by the first epoch.
    vm.disk_writes().start();
    // The guest wrote on while the standby compared: those writes are on
    // the disk and in the maps (noted before they were executed, and
    // `start` waited for any in flight), not in the plan nor the record.
    // Where the standby said "the same", the copy sends them whole.
    send_what_the_plan_missed(forgetter.maps(), &mut held.disks, &disk_bytes);
    let copied = copy_disks(&disks, &disk_bytes, &held.disks, &key, tx, &progress).await?;
    let done = disk_bytes.iter().sum::<u64>();
    let (sent_pages, rounds, memory_unread) = match &held.memory {
        Some(memory) => {
            let known = Known {
                own,
                earlier: offered,
                dirtied,
            };
            copy_memory(vm, tx, config, &progress, done, (memory, &key), known).await?
        }
        None => (0, Vec::new(), 0),
    };
    drain_writes(vm, tx, &progress, 0).await?;
    // The end record: the standby checks it held every batch, once and in
    // order, before it accepts an epoch.
    let end = progress.tally().end();
    tx.send(&Message::SyncEnd(end).into_frame(0, generation))
        .await?;
    // Only the copy sends on this link so far: what it sent is what the
    // A-link counter gained since the plan.
    let sent = status.snapshot().counters.alink_bytes_sent - sent_before;
    let raw = progress
        .copied_bytes
        .load(std::sync::atomic::Ordering::Relaxed);
    status.update(|s| {
        s.counters.sync_sent_bytes_last = sent;
        s.counters.sync_sent_bytes_total += sent;
        s.counters.sync_uncompressed_bytes_last = raw;
        s.counters.sync_disk_unread_bytes_last = copied.unread;
        s.counters.sync_memory_unread_bytes_last = memory_unread;
        s.counters.sync_yielded_ms_last = copied.yielded.as_millis() as u64;
    });
    info!(
        sent_bytes = sent,
        uncompressed_bytes = raw,
        compression = config.copy_compression,
        disk_bytes_sent = copied.sent,
        disk_bytes_held = copied.held,
        kept_disks = held.disks.iter().filter(|h| !matches!(h, Holding::Zeroed)).count(),
        mapped_disks = held.disks.iter().filter(|h| matches!(h, Holding::Mapped(_))).count(),
        disk_bytes_unread = copied.unread,
        memory_bytes_unread = memory_unread,
        kept_memory = matches!(held.memory, Some(Holding::Kept(_))),
        memory_since = ?held.memory.as_ref().and_then(|m| match m {
            Holding::Since(epoch) => Some(*epoch),
            _ => None,
        }),
        level = %level,
        pages_sent = sent_pages,
        precopy_rounds = ?rounds,
        took_ms = started.elapsed().as_millis() as u64,
        "initial synchronisation sent"
    );
    // What the standby writes to its disks (its first epoch's deadline
    // allows for making it durable).
    Ok(progress
        .disk_bytes
        .load(std::sync::atomic::Ordering::Relaxed))
}

/// Where the copy stands (and the generation its frames carry).
struct Progress<'a> {
    vm: &'a Vm,
    started: Instant,
    /// What the copy sent, for its end record.
    tally: std::sync::Mutex<EndTally>,
    /// Compresses the copy's frames (none at level 0).
    compressor: std::sync::Mutex<Option<Compressor>>,
    /// Payload bytes of the copy's page and disk frames before
    /// compression.
    copied_bytes: std::sync::atomic::AtomicU64,
    /// Payload bytes of its disk frames: what the standby writes to its
    /// disks (the copy, and the writes recorded during it).
    disk_bytes: std::sync::atomic::AtomicU64,
    status: &'a StatusBoard,
    generation: u64,
    total: u64,
}

impl Progress<'_> {
    fn tally(&self) -> std::sync::MutexGuard<'_, EndTally> {
        self.tally.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The frame of one of the copy's page or disk messages, compressed
    /// if the copy compresses.
    fn frame(&self, message: Message, payload_len: usize) -> ft_link::Frame {
        self.copied_bytes
            .fetch_add(payload_len as u64, std::sync::atomic::Ordering::Relaxed);
        let mut compressor = self.compressor.lock().unwrap_or_else(|e| e.into_inner());
        match compressor.as_mut() {
            Some(c) => message.into_compressed_frame(0, self.generation, c),
            None => message.into_frame(0, self.generation),
        }
    }

    fn report(&self, phase: &str, done: u64) {
        let done = done.min(self.total);
        let (rate, eta_s) = rate_and_time_left(done, self.total, self.started.elapsed());
        self.status.update(|s| {
            s.sync = Some(SyncProgress {
                phase: phase.to_string(),
                done_bytes: done,
                total_bytes: self.total,
                rate_bytes_per_s: rate,
                eta_s,
            })
        })
    }
}

/// A copy's rate so far (bytes per second) and the seconds it still needs
/// at that rate (none before a rate is known).
fn rate_and_time_left(done: u64, total: u64, took: std::time::Duration) -> (u64, Option<u64>) {
    let secs = took.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let left = (rate >= 1.0).then(|| (total.saturating_sub(done) as f64 / rate).ceil() as u64);
    (rate as u64, left)
}

/// What the standby holds before the copy.
#[derive(Debug)]
struct Holdings {
    disks: Vec<Holding>,
    /// None at level HA (memory is not copied).
    memory: Option<Holding>,
}

/// How a standby at level HA boots this VM from its mirror.
fn boot_plan(vm: &Vm) -> BootPlan {
    let config = vm.config();
    BootPlan {
        vcpus: config.vcpus,
        mem_mib: config.mem_mib,
        kernel: config.boot.kernel.clone(),
        initrd: config.boot.initrd.clone(),
        cmdline: config.boot.cmdline.clone(),
        macs: config.nets.iter().map(|n| n.mac).collect(),
    }
}

/// What the standby holds of each disk and of memory, from its `SyncHeld`
/// messages: one `Zeroed`, or the digests of every chunk in order. Memory
/// only where `pages` is given (not at level HA).
async fn receive_holdings(
    held: &mut mpsc::UnboundedReceiver<Held>,
    disk_sizes: &[u64],
    (pages, offered): (Option<u64>, Option<&Line>),
    own: Option<&OwnDigests>,
) -> Result<Holdings, PrimaryError> {
    // Chunks per region: the disks, then memory.
    let chunks: Vec<u64> = disk_sizes
        .iter()
        .map(|&size| disk_chunks(size))
        .chain(pages)
        .collect();
    let mut holdings: Vec<Option<Holding>> = vec![None; chunks.len()];
    let complete = |h: &[Option<Holding>]| {
        h.iter().zip(&chunks).all(|(h, &count)| match h {
            Some(Holding::Zeroed | Holding::Since(_)) => true,
            Some(h) => h.chunks_said() == Some(count),
            None => false,
        })
    };
    while !complete(&holdings) {
        let Some(Held { region, part }) = held.recv().await else {
            return Err(PrimaryError::AckStreamEnded);
        };
        let bad = |why: String| PrimaryError::BadHolding {
            region: region.to_string(),
            why,
        };
        let index = match region {
            Region::Disk(disk) if (disk as usize) < disk_sizes.len() => disk as usize,
            Region::Disk(_) => return Err(bad(format!("the VM has {} disks", disk_sizes.len()))),
            Region::Memory if pages.is_some() => disk_sizes.len(),
            Region::Memory => return Err(bad("memory is not copied at level HA".into())),
        };
        let holding = &mut holdings[index];
        match (holding.as_mut(), part) {
            (None, HeldPart::Zeroed) => {
                if region == Region::Memory {
                    // Nothing to compare this node's digests with.
                    own.inspect(|own| own.stop());
                }
                *holding = Some(Holding::Zeroed)
            }
            (
                None,
                HeldPart::Digests {
                    first_chunk: 0,
                    digests,
                },
            ) => *holding = Some(Holding::Kept(digests)),
            (
                Some(Holding::Kept(known)),
                HeldPart::Digests {
                    first_chunk,
                    digests,
                },
            ) if first_chunk == known.len() as u64 => known.extend(digests),
            (
                Some(Holding::Mapped(known)),
                HeldPart::Digests {
                    first_chunk,
                    digests,
                },
            ) if first_chunk == known.len() as u64 => {
                known.extend(digests.into_iter().map(MappedChunk::Digest))
            }
            (_, HeldPart::Same { .. }) if matches!(region, Region::Memory) => {
                return Err(bad("memory has no written map".into()))
            }
            (_, HeldPart::Same { first_chunk, count })
                if first_chunk
                    .checked_add(count)
                    .is_none_or(|end| end > chunks[index]) =>
            {
                return Err(bad(format!(
                    "chunks {first_chunk}+{count} the same, of {} chunks",
                    chunks[index]
                )))
            }
            (
                None,
                HeldPart::Same {
                    first_chunk: 0,
                    count,
                },
            ) => *holding = Some(Holding::Mapped(vec![MappedChunk::Same; count as usize])),
            (Some(Holding::Kept(known)), HeldPart::Same { first_chunk, count })
                if first_chunk == known.len() as u64 =>
            {
                let mut mapped: Vec<MappedChunk> = std::mem::take(known)
                    .into_iter()
                    .map(MappedChunk::Digest)
                    .collect();
                mapped.resize(mapped.len() + count as usize, MappedChunk::Same);
                *holding = Some(Holding::Mapped(mapped));
            }
            (Some(Holding::Mapped(known)), HeldPart::Same { first_chunk, count })
                if first_chunk == known.len() as u64 =>
            {
                known.resize(known.len() + count as usize, MappedChunk::Same)
            }
            (Some(_), HeldPart::Zeroed) => {
                return Err(bad("all zeros, after it said what it holds".into()))
            }
            (None, HeldPart::Since { epoch })
                if region == Region::Memory && offered.is_some_and(|l| l.covers(epoch)) =>
            {
                // Nothing to compare: the pages written since are known.
                own.inspect(|own| own.stop());
                *holding = Some(Holding::Since(epoch))
            }
            (_, HeldPart::Since { epoch }) => {
                return Err(bad(format!(
                    "checkpoint {epoch} of a session this primary did not offer, or said late"
                )))
            }
            (_, HeldPart::Digests { first_chunk, .. } | HeldPart::Same { first_chunk, .. }) => {
                return Err(bad(format!(
                    "digests from chunk {first_chunk} out of order"
                )))
            }
        }
        if let Some(said) = holding.as_ref().and_then(Holding::chunks_said) {
            if said > chunks[index] {
                return Err(bad(format!("{said} digests for {} chunks", chunks[index])));
            }
        }
    }
    let mut all: Vec<Holding> = holdings.into_iter().map(|h| h.expect("complete")).collect();
    let memory = pages.map(|_| all.pop().expect("memory's holding"));
    Ok(Holdings { disks: all, memory })
}

/// Disk bytes the copy sent and found the standby already held, and of
/// those held how many it did not read (the same by the written maps).
struct Copied {
    sent: u64,
    held: u64,
    unread: u64,
    /// How long its reads yielded to the guest's writes.
    yielded: std::time::Duration,
}

/// Refuses a standby that says a chunk is the same by the written maps
/// where the primary's own map named it in the plan, or of a disk whose
/// map in the plan named no common point.
fn check_mapped(
    holdings: &[Holding],
    sizes: &[u64],
    own_written: &[Option<Vec<Extents>>],
) -> Result<(), PrimaryError> {
    for (index, holding) in holdings.iter().enumerate() {
        let Holding::Mapped(said) = holding else {
            continue;
        };
        let bad = |why: String| PrimaryError::BadHolding {
            region: Region::Disk(index as u32).to_string(),
            why,
        };
        let Some(own) = own_written.get(index).and_then(Option::as_ref) else {
            return Err(bad(
                "compared by the written maps, where the primary's plan named no common point"
                    .into(),
            ));
        };
        for chunks in crate::written::chunks_of(own, sizes[index]) {
            if let Some(chunk) = chunks
                .clone()
                .find(|&c| said[c as usize] == MappedChunk::Same)
            {
                return Err(bad(format!(
                    "chunk {chunk} the same by the written maps, where the primary's map names it"
                )));
            }
        }
    }
    Ok(())
}

/// Marks for sending whole every chunk a disk's map names now that the
/// standby said was the same (written between the plan and the record's
/// start); logs how many.
fn send_what_the_plan_missed(maps: &crate::written::Maps, holdings: &mut [Holding], sizes: &[u64]) {
    for (index, map) in maps.iter().enumerate() {
        let (Some(map), Some(holding)) = (map, holdings.get_mut(index)) else {
            continue;
        };
        let late: u64 = crate::written::chunks_of(&map.written(), sizes[index])
            .into_iter()
            .map(|chunks| holding.send_instead_of_same(chunks))
            .sum();
        if late > 0 {
            info!(
                disk = index,
                chunks = late,
                "chunks written while the standby compared: sent whole"
            );
        }
    }
}

/// The disks, read 1 MiB at a time; only the chunks the standby does not
/// hold are sent.
async fn copy_disks(
    disks: &[std::path::PathBuf],
    sizes: &[u64],
    holdings: &[Holding],
    key: &ContentKey,
    tx: &LinkSender,
    progress: &Progress<'_>,
) -> Result<Copied, PrimaryError> {
    let mut sent = 0u64;
    let mut held = 0u64;
    let mut unread = 0u64;
    let mut done = 0u64;
    let mut share = DiskShare::new(progress.vm.disk_writes().rings());
    for (index, path) in disks.iter().enumerate() {
        let read_err = |source| PrimaryError::ReadDisk {
            path: path.clone(),
            source,
        };
        let file = std::fs::File::open(path).map_err(read_err)?;
        let mut offset = 0u64;
        let mut buf = vec![0u8; DISK_BYTES_PER_FRAME];
        while offset < sizes[index] {
            let n = (sizes[index] - offset).min(buf.len() as u64) as usize;
            let first = offset / DISK_CHUNK as u64;
            let chunks = first..first + (n as u64).div_ceil(DISK_CHUNK as u64);
            if holdings[index].same_by_map(chunks) {
                held += n as u64;
                unread += n as u64;
                offset += n as u64;
                done += n as u64;
                continue;
            }
            // Read and compared in one go off the workers (long on a slow
            // CPU, and nothing here awaits meanwhile).
            let (read, missing) = crate::workers::off_the_workers(|| {
                let read_at = Instant::now();
                file.read_exact_at(&mut buf[..n], offset)?;
                let read = read_at.elapsed();
                Ok((
                    read,
                    missing_ranges(&holdings[index], key, offset, &buf[..n]),
                ))
            })
            .map_err(read_err)?;
            let wait = share.after_read(progress.vm.disk_writes().rings(), read);
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let missing_bytes: usize = missing.iter().map(|(s, e)| e - s).sum();
            held += (n - missing_bytes) as u64;
            if !missing.is_empty() {
                // Only the missing ranges are copied out of the buffer.
                let records = missing.into_iter().map(|(start, end)| DiskRecord {
                    disk: index as u32,
                    offset: offset + start as u64,
                    data: Bytes::copy_from_slice(&buf[start..end]),
                });
                sent += send_disk(tx, records, progress).await?;
            }
            offset += n as u64;
            done += n as u64;
            progress.report("disk", done);
            sent += drain_writes(progress.vm, tx, progress, DRAIN_WRITES_AT).await?;
        }
    }
    progress.report("disk", done);
    if !share.waited.is_zero() {
        info!(
            yielded_ms = share.waited.as_millis() as u64,
            "the copy's disk reads yielded to the guest's writes"
        );
    }
    Ok(Copied {
        sent,
        held,
        unread,
        yielded: share.waited,
    })
}

/// The copy's share of the disk while the guest writes: after a read that
/// found the guest writing since the one before, the copy waits as long as
/// the read took, so a busy guest keeps at least half the disk's time
/// (DRBD's resync controller backs off on application I/O the same way).
/// An idle guest's disk is read at full speed.
struct DiskShare {
    /// The write record's rings at the last read.
    seen: u64,
    /// How long the copy waited in all.
    waited: std::time::Duration,
}

impl DiskShare {
    fn new(rings: u64) -> DiskShare {
        DiskShare {
            seen: rings,
            waited: std::time::Duration::ZERO,
        }
    }

    /// How long to wait after a read that took `took`, the write record
    /// having rung `rings` times by its end.
    fn after_read(&mut self, rings: u64, took: std::time::Duration) -> std::time::Duration {
        if rings == self.seen {
            return std::time::Duration::ZERO;
        }
        self.seen = rings;
        self.waited += took;
        took
    }
}

/// Memory, while the guest runs: against a labelled standby the pages
/// written since its checkpoint; otherwise every page it does not hold
/// (non-zero, or whose digest differs from what it kept). Then the pages
/// dirtied meanwhile, in pre-copy rounds.
/// Returns the pages sent by the first pass, the size of each round, and
/// the bytes of memory not read (brought forward from a checkpoint).
async fn copy_memory(
    vm: &Vm,
    tx: &LinkSender,
    config: &PrimaryConfig,
    progress: &Progress<'_>,
    mut done: u64,
    (held, key): (&Holding, &ContentKey),
    known: Known<'_>,
) -> Result<(u64, Vec<u64>, u64), PrimaryError> {
    let stage_err = |source| PrimaryError::Stage { epoch: 0, source };
    let total_pages = vm.guest_pages();
    if let Holding::Since(epoch) = held {
        // The pages written after the standby's checkpoint: by the
        // line's later epochs, and since the last of them (the log
        // harvested when the copy began; what the guest writes from then
        // on, the pre-copy rounds send).
        let line = known.earlier.expect("a checkpoint only of a line offered");
        let mut set = PageSet::new(total_pages);
        line.mark_after(*epoch, &mut set);
        for &page in known.dirtied.iter().flatten() {
            set.insert(page);
        }
        let listed = set.to_vec();
        info!(
            checkpoint = epoch,
            pages = listed.len(),
            "the standby's memory is brought forward from its checkpoint: only the pages written since are sent"
        );
        let mut stager = PageStager::default();
        for (i, batch) in listed.chunks(SCAN_PAGES as usize).enumerate() {
            crate::workers::off_the_workers(|| {
                vm.stage_listed_pages(batch.iter().copied(), &mut stager)
            })
            .map_err(stage_err)?;
            send_pages(tx, stager.take_full(), progress).await?;
            drain_writes(vm, tx, progress, DRAIN_WRITES_AT).await?;
            // Shown as a share of the guest's memory.
            let sent = ((i + 1) * SCAN_PAGES as usize).min(listed.len()) as u64;
            let share = total_pages * sent / listed.len() as u64;
            progress.report("memory", done + share * PAGE_SIZE as u64);
        }
        let first_pass = stager.count();
        send_pages(tx, stager.finish().batches, progress).await?;
        let rounds = precopy_rounds(vm, tx, config, progress).await?;
        let unread = (total_pages - listed.len() as u64) * PAGE_SIZE as u64;
        return Ok((first_pass, rounds, unread));
    }
    let own = known.own;
    // Against kept memory, the digests this node made while the standby
    // made its own (the pages written since are sent by the pre-copy
    // rounds); otherwise (a new standby holds zeros) each page is looked
    // at as it is read, and the pre-copy starts from here.
    let own = match (held, own) {
        (Holding::Kept(_), Some(own)) => Some(own.finish().await?),
        _ => {
            vm.clear_dirty().map_err(stage_err)?;
            None
        }
    };
    let mut stager = PageStager::default();
    let mut first = 0;
    while first < total_pages {
        let end = (first + SCAN_PAGES).min(total_pages);
        // Reading and digesting a batch of pages takes long on a slow
        // CPU, and nothing here awaits meanwhile.
        crate::workers::off_the_workers(|| match (&own, held) {
            (Some(own), Holding::Kept(kept)) => {
                let differ = (first..end).filter(|&n| kept.get(n as usize) != own.get(n as usize));
                vm.stage_listed_pages(differ, &mut stager)
            }
            _ => vm.stage_pages_where(first..end, &mut stager, |n, page| !held.holds(key, n, page)),
        })
        .map_err(stage_err)?;
        send_pages(tx, stager.take_full(), progress).await?;
        drain_writes(vm, tx, progress, DRAIN_WRITES_AT).await?;
        done += (end - first) * PAGE_SIZE as u64;
        progress.report("memory", done);
        first = end;
    }
    let first_pass = stager.count();
    send_pages(tx, stager.finish().batches, progress).await?;
    let rounds = precopy_rounds(vm, tx, config, progress).await?;
    Ok((first_pass, rounds, 0))
}

/// What the copy of memory knows besides the standby's word.
struct Known<'a> {
    /// This node's digests in the making (against kept memory).
    own: Option<OwnDigests>,
    /// The line a labelled standby is brought forward from.
    earlier: Option<&'a Line>,
    /// The pages written since that line's last checkpoint.
    dirtied: Option<Vec<u64>>,
}

/// Pre-copy rounds: the pages the guest dirtied during the copy, until a
/// round is small; returns the size of each.
async fn precopy_rounds(
    vm: &Vm,
    tx: &LinkSender,
    config: &PrimaryConfig,
    progress: &Progress<'_>,
) -> Result<Vec<u64>, PrimaryError> {
    let stage_err = |source| PrimaryError::Stage { epoch: 0, source };
    let mut rounds = Vec::new();
    for _ in 0..config.precopy_rounds {
        let mut stager = PageStager::default();
        let pages = vm.harvest_dirty_into(&mut stager).map_err(stage_err)?;
        rounds.push(pages);
        send_pages(tx, stager.finish().batches, progress).await?;
        progress.report("memory (pre-copy)", progress.total);
        if pages < SMALL_ROUND {
            break;
        }
    }
    Ok(rounds)
}

/// This node's digest of each page of guest memory under the session's
/// key, made on a thread of its own while the standby digests the memory
/// it kept: both read the whole of it, at once instead of one after the
/// other. The dirty log is harvested before it starts (see
/// `initial_sync`), so a page written after its digest was made is sent
/// by the pre-copy rounds whatever its digest says. Dropped unfinished (a
/// new standby, a labelled one, or a failed copy), it stops.
struct OwnDigests {
    task: tokio::task::JoinHandle<Result<Option<Vec<ChunkDigest>>, ReplicationError>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

impl OwnDigests {
    fn start(vm: &Arc<Vm>, key: ContentKey) -> OwnDigests {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (vm, stopped) = (Arc::clone(vm), Arc::clone(&stop));
        let task = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let mut page = [0u8; PAGE_SIZE];
            let pages = vm.guest_pages();
            let mut digests = Vec::with_capacity(pages as usize);
            for n in 0..pages {
                if n % SCAN_PAGES == 0 && stopped.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(None);
                }
                vm.read_memory(n * PAGE_SIZE as u64, &mut page)?;
                digests.push(key.digest(&page));
            }
            info!(
                pages,
                took_ms = started.elapsed().as_millis() as u64,
                "this node's memory digested for the copy"
            );
            Ok(Some(digests))
        });
        OwnDigests { task, stop }
    }

    /// The digests, once all are made.
    async fn finish(mut self) -> Result<Vec<ChunkDigest>, PrimaryError> {
        match (&mut self.task).await {
            Ok(Ok(Some(digests))) => Ok(digests),
            // (Only a memory said new stops it, and then it is not
            // awaited: not seen.)
            Ok(Ok(None)) => Err(PrimaryError::DigestMemoryTask("stopped".into())),
            Ok(Err(e)) => Err(PrimaryError::DigestMemory(e)),
            Err(e) => Err(PrimaryError::DigestMemoryTask(e.to_string())),
        }
    }
}

impl OwnDigests {
    /// Stops the digesting (within a batch of pages).
    fn stop(&self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

impl Drop for OwnDigests {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Sends the disk writes recorded so far once they hold `at_least` bytes;
/// returns the bytes sent.
async fn drain_writes(
    vm: &Vm,
    tx: &LinkSender,
    progress: &Progress<'_>,
    at_least: u64,
) -> Result<u64, PrimaryError> {
    let writes = vm.disk_writes();
    if writes.held_bytes() < at_least.max(1) {
        return Ok(0);
    }
    let records = writes.take().into_iter().map(|w| DiskRecord {
        disk: w.disk,
        offset: w.offset,
        data: Bytes::from(w.data),
    });
    send_disk(tx, records, progress).await
}

/// Sends disk records as SyncDisk frames (tallied for the end record);
/// returns the bytes sent.
async fn send_disk(
    tx: &LinkSender,
    records: impl IntoIterator<Item = DiskRecord>,
    progress: &Progress<'_>,
) -> Result<u64, PrimaryError> {
    let (batches, _) = disk_payloads(records);
    let frames: Vec<_> = batches
        .into_iter()
        .map(|b| {
            progress.tally().add_disk(&b);
            let len = b.bytes().len();
            progress
                .disk_bytes
                .fetch_add(len as u64, std::sync::atomic::Ordering::Relaxed);
            progress.frame(Message::SyncDisk(b), len)
        })
        .collect();
    send_all(tx, &frames, progress.status).await
}

async fn send_pages(
    tx: &LinkSender,
    batches: Vec<crate::protocol::PageBatch>,
    progress: &Progress<'_>,
) -> Result<(), PrimaryError> {
    let frames: Vec<_> = batches
        .into_iter()
        .map(|b| {
            progress.tally().add_pages(&b);
            let len = b.bytes().len();
            progress.frame(Message::SyncPages(b), len)
        })
        .collect();
    send_all(tx, &frames, progress.status).await.map(|_| ())
}

#[cfg(test)]
#[allow(clippy::single_range_in_vec_init)] // ranges of extents
mod tests {
    use super::*;
    use crate::content::DISK_CHUNK;

    fn digests(n: usize) -> HeldPart {
        HeldPart::Digests {
            first_chunk: 0,
            digests: vec![[1; 16]; n],
        }
    }

    async fn holdings(
        sizes: &[u64],
        pages: u64,
        messages: Vec<Held>,
    ) -> Result<Holdings, PrimaryError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        for m in messages {
            tx.send(m).unwrap();
        }
        drop(tx);
        receive_holdings(&mut rx, sizes, (Some(pages), None), None).await
    }

    fn held(region: Region, part: HeldPart) -> Held {
        Held { region, part }
    }

    #[test]
    fn the_rate_and_time_left_follow_the_copy_so_far() {
        let second = std::time::Duration::from_secs(1);
        assert_eq!(rate_and_time_left(0, 100, second), (0, None));
        assert_eq!(rate_and_time_left(25, 100, second * 5), (5, Some(15)));
        assert_eq!(rate_and_time_left(100, 100, second), (100, Some(0)));
        assert_eq!(
            rate_and_time_left(10, 100, std::time::Duration::ZERO),
            (0, None)
        );
    }

    #[tokio::test]
    async fn holdings_in_several_parts_in_any_region_order_are_assembled() {
        let size = 3 * DISK_CHUNK as u64 + 1;
        let got = holdings(
            &[size, 5],
            4,
            vec![
                held(Region::Memory, digests(4)),
                held(Region::Disk(1), HeldPart::Zeroed),
                held(Region::Disk(0), digests(2)),
                held(
                    Region::Disk(0),
                    HeldPart::Digests {
                        first_chunk: 2,
                        digests: vec![[2; 16]; 2],
                    },
                ),
            ],
        )
        .await
        .unwrap();
        assert_eq!(
            got.disks[0],
            Holding::Kept([[1; 16], [1; 16], [2; 16], [2; 16]].to_vec())
        );
        assert_eq!(got.disks[1], Holding::Zeroed);
        assert_eq!(got.memory, Some(Holding::Kept(vec![[1; 16]; 4])));
    }

    /// Memory labelled with a checkpoint the primary offered is held
    /// "since" that checkpoint; one it did not offer (or a disk said so)
    /// breaks the protocol.
    #[tokio::test]
    async fn a_checkpoint_is_accepted_only_where_offered() {
        let history = super::super::history::MemoryHistory::default();
        history.begin([1; 16]);
        history.record(1, [3], 100);
        history.record(2, [4], 100);
        let line = history.begin([2; 16]).unwrap();
        let since = |epoch| held(Region::Memory, HeldPart::Since { epoch });
        let zeroed = held(Region::Disk(0), HeldPart::Zeroed);
        let run = |offered: Option<&Line>, messages: Vec<Held>| {
            let (tx, mut rx) = mpsc::unbounded_channel();
            for m in messages {
                tx.send(m).unwrap();
            }
            drop(tx);
            let offered = offered.cloned();
            async move { receive_holdings(&mut rx, &[5], (Some(8), offered.as_ref()), None).await }
        };
        let got = run(Some(&line), vec![since(1), zeroed.clone()])
            .await
            .unwrap();
        assert_eq!(got.memory, Some(Holding::Since(1)));
        for (offered, messages, expected) in [
            (None, vec![since(1)], "did not offer"),
            (Some(&line), vec![since(3)], "did not offer"),
            (
                Some(&line),
                vec![held(Region::Disk(0), HeldPart::Since { epoch: 1 })],
                "did not offer",
            ),
            (
                Some(&line),
                vec![held(Region::Memory, digests(8)), since(1)],
                "late",
            ),
        ] {
            match run(offered, messages).await {
                Err(PrimaryError::BadHolding { why, .. }) => {
                    assert!(why.contains(expected), "{why}")
                }
                Err(other) => panic!("another error: {other}"),
                Ok(got) => panic!("accepted: {got:?}"),
            }
        }
    }

    /// Level HA: the standby says what it holds of its disks alone; a word
    /// on memory breaks the protocol.
    #[tokio::test]
    async fn at_level_ha_holdings_are_of_the_disks_alone() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        tx.send(held(Region::Disk(0), HeldPart::Zeroed)).unwrap();
        let got = receive_holdings(&mut rx, &[5], (None, None), None)
            .await
            .unwrap();
        assert_eq!((got.disks, got.memory), (vec![Holding::Zeroed], None));
        tx.send(held(Region::Memory, HeldPart::Zeroed)).unwrap();
        tx.send(held(Region::Disk(0), HeldPart::Zeroed)).unwrap();
        match receive_holdings(&mut rx, &[5], (None, None), None).await {
            Err(PrimaryError::BadHolding { why, .. }) => {
                assert!(why.contains("level HA"), "{why}")
            }
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("accepted"),
        }
    }

    #[tokio::test]
    async fn wrong_holdings_end_the_session_with_the_region_and_why() {
        let bad = |result: Result<Holdings, PrimaryError>| match result {
            Err(PrimaryError::BadHolding { region, why }) => format!("{region}: {why}"),
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("accepted"),
        };
        let chunk = DISK_CHUNK as u64;
        // A disk the VM does not have.
        let why = bad(holdings(&[chunk], 1, vec![held(Region::Disk(1), HeldPart::Zeroed)]).await);
        assert!(why.contains("disk 1") && why.contains("1 disks"), "{why}");
        // More digests than chunks.
        let why = bad(holdings(&[chunk], 1, vec![held(Region::Memory, digests(2))]).await);
        assert!(
            why.contains("memory") && why.contains("2 digests for 1"),
            "{why}"
        );
        // Digests out of order, or not from the first chunk.
        let gap = HeldPart::Digests {
            first_chunk: 3,
            digests: vec![[0; 16]],
        };
        let why = bad(holdings(
            &[4 * chunk],
            1,
            vec![
                held(Region::Disk(0), digests(1)),
                held(Region::Disk(0), gap.clone()),
            ],
        )
        .await);
        assert!(why.contains("from chunk 3 out of order"), "{why}");
        let why = bad(holdings(&[4 * chunk], 1, vec![held(Region::Disk(0), gap)]).await);
        assert!(why.contains("out of order"), "{why}");
        // Said twice.
        let twice = vec![
            held(Region::Disk(0), HeldPart::Zeroed),
            held(Region::Disk(0), HeldPart::Zeroed),
        ];
        let why = bad(holdings(&[chunk], 1, twice).await);
        assert!(why.contains("after it said what it holds"), "{why}");
        // The standby goes away before it said everything.
        assert!(matches!(
            holdings(&[chunk], 1, vec![held(Region::Disk(0), HeldPart::Zeroed)]).await,
            Err(PrimaryError::AckStreamEnded)
        ));
    }

    /// Resynchronisation by written maps: runs of chunks "the same" and of
    /// digests, in order, make one mapped holding; a run past the disk, a
    /// run of memory, and "the same" where the primary's own map names the
    /// chunk are refused.
    #[tokio::test]
    async fn mapped_holdings_are_assembled_and_checked_against_the_primarys_map() {
        let per = crate::written::CHUNKS_PER_EXTENT;
        let size = 3 * vmm::replication::written_map::EXTENT_BYTES;
        let same = |first_chunk, count| HeldPart::Same { first_chunk, count };
        let got = holdings(
            &[size],
            1,
            vec![
                held(Region::Disk(0), same(0, per)),
                held(
                    Region::Disk(0),
                    HeldPart::Digests {
                        first_chunk: per,
                        digests: vec![[3; 16]; per as usize],
                    },
                ),
                held(Region::Disk(0), same(2 * per, per)),
                held(Region::Memory, digests(1)),
            ],
        )
        .await
        .unwrap();
        let Holding::Mapped(mapped) = &got.disks[0] else {
            panic!("not mapped: {:?}", got.disks[0])
        };
        assert_eq!(mapped.len() as u64, 3 * per);
        assert!(got.disks[0].same_by_map(0..per));
        assert!(!got.disks[0].same_by_map(per - 1..per + 1));
        assert!(got.disks[0].same_by_map(2 * per..3 * per));
        assert_eq!(mapped[per as usize], MappedChunk::Digest([3; 16]));
        // The primary's map names extent 1 (digested: fine) or extent 2
        // (said the same: refused); a plan without a common point takes
        // no word by the maps.
        check_mapped(&got.disks, &[size], &[Some(vec![1..2])]).unwrap();
        for (own, expected) in [
            (Some(vec![2..3]), "the primary's map names it"),
            (None, "named no common point"),
        ] {
            match check_mapped(&got.disks, &[size], &[own]) {
                Err(PrimaryError::BadHolding { why, .. }) => {
                    assert!(why.contains(expected), "{why}")
                }
                other => panic!("accepted: {other:?}"),
            }
        }
        // Written after the plan: chunks said the same are sent whole,
        // digested ones are compared as before.
        let mut late = got.disks[0].clone();
        assert_eq!(late.send_instead_of_same(0..2 * per), per);
        assert!(!late.same_by_map(0..1));
        assert!(!late.holds(&ContentKey([0; 32]), 0, &[0u8; 16]));
        assert!(late.same_by_map(2 * per..3 * per));
        let bad = |result: Result<Holdings, PrimaryError>| match result {
            Err(PrimaryError::BadHolding { why, .. }) => why,
            Err(other) => panic!("another error: {other}"),
            Ok(_) => panic!("accepted"),
        };
        let why = bad(holdings(&[size], 1, vec![held(Region::Disk(0), same(0, 4 * per))]).await);
        assert!(why.contains("the same, of"), "{why}");
        let why = bad(holdings(&[size], 1, vec![held(Region::Disk(0), same(0, u64::MAX))]).await);
        assert!(why.contains("the same, of"), "{why}");
        let why = bad(holdings(&[size], 1, vec![held(Region::Memory, same(0, 1))]).await);
        assert!(why.contains("no written map"), "{why}");
    }

    /// The copy yields the disk only after a read during which the guest
    /// wrote, and then for as long as that read took.
    #[test]
    fn the_copy_yields_the_disk_to_a_writing_guest_for_as_long_as_it_read() {
        let ms = std::time::Duration::from_millis;
        let mut share = DiskShare::new(7);
        assert_eq!(share.after_read(7, ms(4)), ms(0), "an idle guest");
        assert_eq!(share.after_read(9, ms(5)), ms(5), "the guest wrote");
        assert_eq!(share.after_read(9, ms(6)), ms(0), "not since");
        assert_eq!(share.after_read(10, ms(3)), ms(3));
        assert_eq!(share.waited, ms(8));
    }
}
