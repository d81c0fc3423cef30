//! The primary: keeps a running VM protected by a standby.
//!
//! Without a standby the VM runs unprotected (output goes out at once) and
//! the primary keeps trying to reach the peer. Once an A-link is up:
//! 1. [`sync`]: initial synchronisation while the guest runs: disk writes
//!    start being recorded, every disk is copied (all-zero chunks skipped:
//!    the replica starts zeroed), then memory in pre-copy rounds (all
//!    non-zero pages, then the pages dirtied meanwhile) with progress in
//!    the status.
//! 2. [`epochs`]: checkpoints. Each one ([`checkpoint::capture`]) pauses
//!    the vCPUs and device work, captures vCPU/device state, harvests the
//!    dirty pages into frame payloads, takes the disk writes, seals the
//!    transmitted frames as batch N; the guest resumes (speculative mode),
//!    epoch N is sent, and batch N is released when the standby
//!    acknowledges it. At most one epoch is in flight, so a slow standby
//!    delays the next checkpoint (counted as throttled) instead of growing
//!    buffers. In synchronous mode the guest stays paused until the
//!    acknowledgement.
//! 3. Any link failure ends protection: held output is released (this copy
//!    is the only one now), disk recording stops, and the primary goes back
//!    to looking for a standby (which then resynchronises from scratch).

pub mod checkpoint;
mod epochs;
mod sync;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ft_link::{Frame, Link, LinkConfig, LinkError, LinkSender};
use tokio::sync::mpsc;
use tracing::{info, warn};
use vmm::replication::ReplicationError;
use vmm::vm::Vm;

use crate::interval::IntervalLimits;
use crate::protocol::{Message, ProtocolError, StateError};
use crate::status::{FtState, Role, StatusBoard};

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("A-link: {0}")]
    Link(#[from] LinkError),
    #[error("A-link: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the standby sent an unexpected {kind} message (epoch {epoch})")]
    Unexpected { kind: &'static str, epoch: u64 },
    #[error("the standby acknowledged epoch {got}, epoch {expected} was in flight")]
    WrongAck { got: u64, expected: u64 },
    #[error("the standby's acknowledgement stream ended")]
    AckStreamEnded,
    #[error("the VM stopped")]
    VmStopped,
    #[error("checkpoint {epoch}: capturing the state failed: {source}")]
    Capture {
        epoch: u64,
        #[source]
        source: vmm::vm::VmError,
    },
    #[error("checkpoint {epoch}: staging pages failed: {source}")]
    Stage {
        epoch: u64,
        #[source]
        source: ReplicationError,
    },
    #[error(transparent)]
    State(#[from] StateError),
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
    /// Set (before the stop is notified) when the VM ended by a host
    /// fault, not on purpose: the standby is told to take it over
    /// (Handover) instead of to let it go (Stop).
    pub vm_failed: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The generation of the active copy every message carries (the quorum
/// service will grant it; until then one generation).
const GENERATION: u64 = 1;

/// Protects `vm` until `stop` is notified (its guest stopped): then a
/// standby in session is told not to take it over, and this returns.
pub async fn run(
    vm: Arc<Vm>,
    config: PrimaryConfig,
    status: StatusBoard,
    stop: Arc<tokio::sync::Notify>,
) {
    let mut last_refusal = String::new();
    status.set_state(Role::Primary, FtState::Unprotected, None);
    loop {
        let (link, active) = loop {
            let attempt = tokio::select! {
                a = connect_any(&config.peers, &config.link) => a,
                _ = stop.notified() => return,
            };
            match attempt {
                Ok(found) => break found,
                Err(error) => {
                    if error != last_refusal {
                        info!(peers = ?config.peers, %error, "no standby yet; running unprotected");
                        status.update(|s| s.message = Some(error.clone()));
                        last_refusal = error;
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
        let released = vm.output().open();
        vm.disk_writes().stop();
        warn!(%error, released_frames = released, "standby lost: running unprotected");
        status.set_state(
            Role::Primary,
            FtState::Unprotected,
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
    if peers.is_empty() {
        return Err("no peer is configured".into());
    }
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
                let hello = Message::Backup.into_frame(0, GENERATION);
                if link.send(&hello).await.is_ok() {
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
            let event = match rx.recv().await.map(Message::from_frame) {
                Ok(Ok(envelope)) if envelope.message == Message::Ack => Ok(envelope.epoch),
                Ok(Ok(envelope)) => Err(PrimaryError::Unexpected {
                    kind: envelope.message.name(),
                    epoch: envelope.epoch,
                }),
                Ok(Err(e)) => Err(e.into()),
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
        sync::initial_sync(vm, &tx, config, status).await?;
        // The session exists on the standby now: add the backup path.
        backup = Some(spawn_backup_path(config, active));
        epochs::epochs(vm, &tx, &mut acks, config, status, stop).await
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
