//! The primary: keeps a running VM protected by a standby.
//!
//! Without a standby the VM runs unprotected (output goes out at once) and
//! the primary keeps trying to reach the peer. Once an A-link is up:
//! 1. Initial synchronisation while the guest runs: disk writes start being
//!    recorded, every disk is copied (all-zero chunks skipped: the replica
//!    starts zeroed), then memory in pre-copy rounds (all non-zero pages,
//!    then the pages dirtied meanwhile) with progress in the status.
//! 2. Epochs: pause the vCPUs and device work, capture vCPU/device state,
//!    harvest the dirty pages and copy them into frame payloads, take the
//!    disk writes, seal the transmitted frames as batch N, resume the guest
//!    (speculative mode), send epoch N, wait for its acknowledgement, then
//!    release batch N's frames. At most one epoch is in flight, so a slow
//!    standby delays the next checkpoint (counted as throttled) instead of
//!    growing buffers. In synchronous mode the guest stays paused until
//!    the acknowledgement.
//! 3. Any link failure ends protection: held output is released (this copy
//!    is the only one now), disk recording stops, and the primary goes back
//!    to looking for a standby (which then resynchronises from scratch).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::{Frame, FrameKind, Link, LinkConfig, LinkError, LinkSender};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use vm_memory::{Bytes as _, GuestAddress};
use vmm::devices::virtio::block::write_log::WriteLog;
use vmm::devices::virtio::net::tx_gate::TxGate;
use vmm::vm::Vm;

use crate::checkpoint::{
    CheckpointError, CheckpointState, SyncPlan, CHECKPOINT_STATE_VERSION, SYNC_PLAN_VERSION,
};
use crate::epoch::{self, DiskRecord, PAGES_PER_FRAME, PAGE_SIZE};
use crate::interval::IntervalLimits;
use crate::status::{Samples, StatusBoard, SyncProgress};

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("A-link: {0}")]
    Link(#[from] LinkError),
    #[error("the standby sent an unexpected {kind:?} frame (epoch {epoch})")]
    Unexpected { kind: FrameKind, epoch: u64 },
    #[error("the standby acknowledged epoch {got}, epoch {expected} was in flight")]
    WrongAck { got: u64, expected: u64 },
    #[error("the standby's acknowledgement stream ended")]
    AckStreamEnded,
    #[error("the VM stopped")]
    VmStopped,
    #[error("checkpoint {epoch}: {source}")]
    Capture {
        epoch: u64,
        #[source]
        source: vmm::vm::VmError,
    },
    #[error("checkpoint {epoch}: staging pages failed: {source}")]
    Stage {
        epoch: u64,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("reading disk {path} for the initial copy failed: {source}")]
    ReadDisk {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How the primary protects its VM.
#[derive(Debug, Clone)]
pub struct PrimaryConfig {
    /// The standby's addresses, one per path (the A-link first; a second
    /// path makes a redundant pair: the session runs on one, the other
    /// carries heartbeats so the standby can tell a lost path from a lost
    /// primary).
    pub peers: Vec<String>,
    pub link: LinkConfig,
    pub interval: IntervalLimits,
    /// Keep the guest paused until each epoch is acknowledged.
    pub synchronous: bool,
    /// Pre-copy rounds after the first full copy (fewer when the dirty set
    /// gets small).
    pub precopy_rounds: u32,
    /// Wait between attempts to reach a standby.
    pub retry_every: Duration,
    /// The VM's disk image paths, in device order (for the initial copy).
    pub disks: Vec<PathBuf>,
}

/// Protects `vm` until `stop` is notified (its guest stopped): then a
/// standby in session is told not to take it over, and this returns.
pub async fn run(
    vm: Arc<Vm>,
    config: PrimaryConfig,
    status: StatusBoard,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut last_refusal = String::new();
    status.set_state(
        crate::status::Role::Primary,
        crate::status::FtState::Unprotected,
        None,
    );
    loop {
        let (link, active) = loop {
            let attempt = tokio::select! {
                a = connect_any(&config.peers, &config.link) => a,
                _ = stop.notified() => return,
            };
            match attempt {
                Ok(found) => break found,
                Err(error) => {
                    let text = error.to_string();
                    if text != last_refusal {
                        info!(peers = ?config.peers, %error, "no standby yet; running unprotected");
                        status.update(|s| s.message = Some(text.clone()));
                        last_refusal = text;
                    }
                    tokio::time::sleep(config.retry_every).await;
                }
            }
        };
        last_refusal.clear();
        status.update(|s| s.peer = Some(link.peer_addr().to_string()));
        let error = protect(&vm, link, active, &config, &status, &stop).await;
        if matches!(error, PrimaryError::VmStopped) {
            return;
        }
        // The standby is gone: this copy is the only one, so output held
        // for it goes out now and the disks stop being recorded.
        let released: usize = vm.virtio.tx_gates().iter().map(|g| g.open()).sum();
        for log in vm.virtio.write_logs() {
            log.stop();
        }
        warn!(%error, released_frames = released, "standby lost: running unprotected");
        status.set_state(
            crate::status::Role::Primary,
            crate::status::FtState::Unprotected,
            Some(format!("standby lost: {error}")),
        );
        tokio::time::sleep(config.retry_every).await;
    }
}

/// How long one connection attempt may take (a cut path must not hold up
/// the others).
const CONNECT_WITHIN: Duration = Duration::from_secs(2);

async fn connect_one(addr: &str, config: &LinkConfig) -> Result<Link, String> {
    match tokio::time::timeout(CONNECT_WITHIN, Link::connect(addr, config)).await {
        Ok(Ok(link)) => Ok(link),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("connecting to {addr} took over {CONNECT_WITHIN:?}")),
    }
}

/// Connects to the first peer address that answers; returns the link and
/// the index of that address.
async fn connect_any(peers: &[String], config: &LinkConfig) -> Result<(Link, usize), String> {
    let mut errors = Vec::new();
    for (index, addr) in peers.iter().enumerate() {
        match connect_one(addr, config).await {
            Ok(link) => return Ok((link, index)),
            Err(e) => errors.push(e),
        }
    }
    Err(errors.join("; "))
}

/// Keeps a backup path open to every other peer address while the session
/// runs on `active` (reconnecting when one drops).
fn spawn_backup_path(config: &PrimaryConfig, active: usize) -> tokio::task::JoinHandle<()> {
    let others: Vec<String> = config
        .peers
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != active)
        .map(|(_, a)| a.clone())
        .collect();
    let link_config = config.link.clone();
    let retry = config.retry_every;
    tokio::spawn(async move {
        let Some(addr) = others.first() else { return };
        loop {
            if let Ok(link) = connect_one(addr, &link_config).await {
                if link
                    .send(&Frame::new(FrameKind::Backup, 0, Bytes::new()))
                    .await
                    .is_ok()
                {
                    info!(path = %addr, "backup path to the standby is up");
                    let (_sender, mut receiver) = link.split();
                    while receiver.recv().await.is_ok() {}
                    warn!(path = %addr, "backup path to the standby lost");
                }
            }
            tokio::time::sleep(retry).await;
        }
    })
}

/// What the receiving task reports: acknowledged epochs or the end.
type AckEvent = Result<u64, PrimaryError>;

fn spawn_ack_reader(mut rx: ft_link::LinkReceiver) -> mpsc::UnboundedReceiver<AckEvent> {
    let (tx, acks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            let event = match rx.recv().await {
                Ok(f) if f.kind == FrameKind::Ack => Ok(f.epoch),
                Ok(f) => Err(PrimaryError::Unexpected {
                    kind: f.kind,
                    epoch: f.epoch,
                }),
                Err(e) => Err(e.into()),
            };
            let end = event.is_err();
            if tx.send(event).is_err() || end {
                return;
            }
        }
    });
    acks
}

/// Sends frames and counts their bytes.
async fn send_all(
    tx: &LinkSender,
    frames: &[Frame],
    status: &StatusBoard,
) -> Result<u64, PrimaryError> {
    let mut bytes = 0u64;
    for frame in frames {
        tx.send(frame).await?;
        bytes += (ft_link::frame::HEADER_LEN + frame.payload.len()) as u64;
    }
    status.update(|s| s.counters.alink_bytes_sent += bytes);
    Ok(bytes)
}

/// Runs protection over `link` until it fails; returns why.
async fn protect(
    vm: &Arc<Vm>,
    link: Link,
    active: usize,
    config: &PrimaryConfig,
    status: &StatusBoard,
    stop: &tokio::sync::Notify,
) -> PrimaryError {
    let (tx, rx) = link.split();
    let mut acks = spawn_ack_reader(rx);
    let mut backup = None;
    let result = async {
        initial_sync(vm, &tx, config, status).await?;
        // The session exists on the standby now: add the backup path.
        backup = Some(spawn_backup_path(config, active));
        epochs(vm, &tx, &mut acks, config, status, stop).await
    }
    .await;
    if let Some(task) = backup {
        task.abort();
    }
    tx.close().await;
    match result {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.iter().all(|&b| b == 0)
}

async fn initial_sync(
    vm: &Arc<Vm>,
    tx: &LinkSender,
    config: &PrimaryConfig,
    status: &StatusBoard,
) -> Result<(), PrimaryError> {
    let started = Instant::now();
    status.set_state(
        crate::status::Role::Primary,
        crate::status::FtState::Syncing,
        None,
    );
    let logs = vm.virtio.write_logs();
    // Record from before the copy: every write the copy might miss is
    // replayed by the first epoch.
    for log in &logs {
        log.start();
    }
    let mut disk_bytes = Vec::new();
    for path in &config.disks {
        let size = std::fs::metadata(path)
            .map_err(|source| PrimaryError::ReadDisk {
                path: path.clone(),
                source,
            })?
            .len();
        disk_bytes.push(size);
    }
    let plan = SyncPlan {
        version: SYNC_PLAN_VERSION,
        mem_mib: vm.config.mem_mib,
        disk_bytes: disk_bytes.clone(),
        nics: vm.virtio.tx_gates().len(),
    };
    tx.send(&Frame::new(FrameKind::SyncBegin, 0, plan.to_payload()?))
        .await?;
    let total = disk_bytes.iter().sum::<u64>() + (vm.config.mem_mib << 20);
    let mut done = 0u64;
    let progress = |phase: &str, done: u64| {
        status.update(|s| {
            s.sync = Some(SyncProgress {
                phase: phase.to_string(),
                done_bytes: done,
                total_bytes: total,
            })
        })
    };

    // Disks, in 1 MiB chunks.
    let mut sent_disk = 0u64;
    for (index, path) in config.disks.iter().enumerate() {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).map_err(|source| PrimaryError::ReadDisk {
            path: path.clone(),
            source,
        })?;
        let mut offset = 0u64;
        let mut buf = vec![0u8; epoch::DISK_BYTES_PER_FRAME];
        while offset < disk_bytes[index] {
            let n = (disk_bytes[index] - offset).min(buf.len() as u64) as usize;
            file.read_exact_at(&mut buf[..n], offset)
                .map_err(|source| PrimaryError::ReadDisk {
                    path: path.clone(),
                    source,
                })?;
            if !is_zero(&buf[..n]) {
                let (payloads, _) = epoch::disk_payloads([DiskRecord {
                    disk: index as u32,
                    offset,
                    data: Bytes::copy_from_slice(&buf[..n]),
                }]);
                let frames: Vec<Frame> = payloads
                    .into_iter()
                    .map(|p| Frame::new(FrameKind::SyncDisk, 0, p))
                    .collect();
                sent_disk += send_all(tx, &frames, status).await?;
            }
            offset += n as u64;
            done += n as u64;
            progress("disk", done);
        }
    }

    // Memory: clear the dirty log, then copy every non-zero page while the
    // guest runs; the pages it dirties meanwhile go in the next rounds.
    let mem = &vm.ram.memory;
    let total_pages = (vm.config.mem_mib << 20) / PAGE_SIZE as u64;
    vm.harvest_dirty()
        .map_err(|source| PrimaryError::Capture { epoch: 0, source })?;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut batch = Vec::with_capacity(PAGES_PER_FRAME);
    let mut sent_pages = 0u64;
    for n in 0..total_pages {
        mem.read_slice(&mut page, GuestAddress(n * PAGE_SIZE as u64))
            .map_err(|source| PrimaryError::Stage { epoch: 0, source })?;
        if !is_zero(&page) {
            batch.push(n);
        }
        if batch.len() == PAGES_PER_FRAME || (n + 1 == total_pages && !batch.is_empty()) {
            sent_pages += batch.len() as u64;
            send_pages(vm, tx, std::mem::take(&mut batch), status).await?;
            done += PAGES_PER_FRAME as u64 * PAGE_SIZE as u64;
            progress("memory", done.min(total));
        }
    }
    let mut rounds = Vec::new();
    for _ in 0..config.precopy_rounds {
        let dirty = vm
            .harvest_dirty()
            .map_err(|source| PrimaryError::Capture { epoch: 0, source })?;
        let pages: Vec<u64> = dirty.page_numbers().collect();
        rounds.push(pages.len());
        let small = pages.len() < 256;
        for chunk in pages.chunks(PAGES_PER_FRAME) {
            send_pages(vm, tx, chunk.to_vec(), status).await?;
        }
        progress("memory (pre-copy)", total);
        if small {
            break;
        }
    }
    info!(
        disk_bytes_sent = sent_disk,
        nonzero_pages = sent_pages,
        precopy_rounds = ?rounds,
        took_ms = started.elapsed().as_millis() as u64,
        "initial synchronisation sent"
    );
    Ok(())
}

async fn send_pages(
    vm: &Vm,
    tx: &LinkSender,
    pages: Vec<u64>,
    status: &StatusBoard,
) -> Result<(), PrimaryError> {
    let (payloads, _) = epoch::stage_pages(&vm.ram.memory, pages)
        .map_err(|source| PrimaryError::Stage { epoch: 0, source })?;
    let frames: Vec<Frame> = payloads
        .into_iter()
        .map(|p| Frame::new(FrameKind::SyncPages, 0, p))
        .collect();
    send_all(tx, &frames, status).await.map(|_| ())
}

/// One checkpoint's capture, taken while the guest is stopped.
struct Captured {
    state: CheckpointState,
    pages: (Vec<Bytes>, u64),
    writes: (Vec<Bytes>, u64),
}

/// Pauses the guest and captures checkpoint `epoch`; the guest stays
/// paused (the caller resumes it).
/// The device hooks a checkpoint touches, looked up once per session.
struct Hooks {
    gates: Vec<Arc<TxGate>>,
    logs: Vec<Arc<WriteLog>>,
}

fn capture(vm: &Vm, hooks: &Hooks, epoch: u64) -> Result<Captured, PrimaryError> {
    vm.pause();
    let gates = &hooks.gates;
    if epoch == 1 {
        // Output is held from the first epoch on.
        for gate in gates {
            gate.hold();
        }
    }
    let err = |source| PrimaryError::Capture { epoch, source };
    let machine = vm.capture_state().map_err(err)?;
    let dirty = vm.harvest_dirty().map_err(err)?;
    let pages = epoch::stage_pages(&vm.ram.memory, dirty.page_numbers())
        .map_err(|source| PrimaryError::Stage { epoch, source })?;
    let writes: Vec<DiskRecord> = hooks
        .logs
        .iter()
        .enumerate()
        .flat_map(|(disk, log)| {
            log.take().into_iter().map(move |w| DiskRecord {
                disk: disk as u32,
                offset: w.offset,
                data: Bytes::from(w.data),
            })
        })
        .collect();
    let mut guest_ipv4 = Vec::new();
    for gate in gates {
        gate.seal(epoch);
        guest_ipv4.extend(gate.guest_ipv4());
    }
    // Encoded after the guest resumes (see `epochs`).
    let state = CheckpointState {
        version: CHECKPOINT_STATE_VERSION,
        machine,
        guest_ipv4,
    };
    Ok(Captured {
        state,
        pages,
        writes: epoch::disk_payloads(writes),
    })
}

async fn epochs(
    vm: &Arc<Vm>,
    tx: &LinkSender,
    acks: &mut mpsc::UnboundedReceiver<AckEvent>,
    config: &PrimaryConfig,
    status: &StatusBoard,
    stop: &tokio::sync::Notify,
) -> Result<std::convert::Infallible, PrimaryError> {
    let hooks = Hooks {
        gates: vm.virtio.tx_gates(),
        logs: vm.virtio.write_logs(),
    };
    let gates = &hooks.gates;
    // Held output wakes the wait for the next checkpoint.
    let output = Arc::new(tokio::sync::Notify::new());
    for gate in gates {
        let output = Arc::clone(&output);
        gate.on_held_output(Box::new(move || output.notify_one()));
    }
    let mut stops = Samples::default();
    let mut ack_times = Samples::default();
    let mut next_due = Instant::now();
    let mut interval = config.interval.min;
    for epoch in 1.. {
        // Wait for the checkpoint to be due; output produced meanwhile
        // brings it forward.
        let earliest = next_due - interval + config.interval.min;
        loop {
            let now = Instant::now();
            let waiting = gates.iter().any(|g| g.unsealed() > 0);
            if now >= next_due || (waiting && now >= earliest) {
                break;
            }
            let wake = if waiting { earliest } else { next_due };
            tokio::select! {
                _ = tokio::time::sleep_until(wake.into()) => {}
                _ = output.notified() => {}
                _ = stop.notified() => {
                    // The guest stopped on purpose: no takeover.
                    let _ = tx.send(&Frame::new(FrameKind::Stop, epoch, Bytes::new())).await;
                    return Err(PrimaryError::VmStopped);
                }
            }
        }
        let late = Instant::now().saturating_duration_since(next_due) > config.interval.max;

        let stop_start = Instant::now();
        let captured = match capture(vm, &hooks, epoch) {
            Ok(c) => c,
            Err(e) => {
                vm.resume();
                return Err(e);
            }
        };
        if !config.synchronous {
            vm.resume();
        }
        let mut stopped = stop_start.elapsed();
        let dirty = captured.pages.1;
        let writes = captured.writes.1;
        let state = match captured.state.to_payload() {
            Ok(s) => s,
            Err(e) => {
                if config.synchronous {
                    vm.resume();
                }
                return Err(e.into());
            }
        };
        let frames = epoch::frames(epoch, Bytes::from(state), captured.pages, captured.writes);
        let sent = send_all(tx, &frames, status).await;
        let sent_at = Instant::now();
        let acked = match sent {
            Ok(_) => match acks.recv().await {
                Some(Ok(got)) if got == epoch => Ok(()),
                Some(Ok(got)) => Err(PrimaryError::WrongAck {
                    got,
                    expected: epoch,
                }),
                Some(Err(e)) => Err(e),
                None => Err(PrimaryError::AckStreamEnded),
            },
            Err(e) => Err(e),
        };
        if config.synchronous {
            vm.resume();
            stopped = stop_start.elapsed();
        }
        acked?;
        let ack_time = sent_at.elapsed();
        // Output commit: batch `epoch` may leave now.
        let released: usize = gates.iter().map(|g| g.release_through(epoch)).sum();
        stops.push(stopped);
        ack_times.push(ack_time);
        let waiting = gates.iter().any(|g| g.unsealed() > 0);
        interval = config.interval.next(stopped, waiting);
        next_due = Instant::now() + interval;
        let held_now: u64 = gates.iter().map(|g| g.counters().holding_frames).sum();
        status.update(|s| {
            let c = &mut s.counters;
            s.epoch = epoch;
            c.checkpoints += 1;
            c.stop_us_p50 = stops.percentile_us(50.0);
            c.stop_us_p99 = stops.percentile_us(99.0);
            c.stop_us_max = c.stop_us_max.max(stopped.as_micros() as u64);
            c.ack_us_p50 = ack_times.percentile_us(50.0);
            c.ack_us_p99 = ack_times.percentile_us(99.0);
            c.interval_us_last = interval.as_micros() as u64;
            c.dirty_pages_total += dirty;
            c.dirty_pages_last = dirty;
            c.disk_writes_total += writes;
            c.output_frames_released += released as u64;
            c.output_frames_held_now = held_now;
            if late {
                c.throttled += 1;
            }
        });
        if epoch == 1 {
            status.set_state(
                crate::status::Role::Primary,
                crate::status::FtState::Protected,
                None,
            );
        }
        debug!(
            epoch,
            stop_us = stopped.as_micros() as u64,
            dirty,
            ack_us = ack_time.as_micros() as u64,
            released,
            "epoch committed"
        );
    }
    unreachable!("epochs run until the link fails")
}
