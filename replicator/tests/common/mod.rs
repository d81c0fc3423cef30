//! What the standby tests share: an authenticated A-link on loopback, a
//! standby task with its replica in a temporary folder, epochs made of one
//! page and one disk write, and the checks on the replica handed over.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ft_link::{CpuFeatureSummary, Frame, Hello, Link, LinkConfig, PairSecret, Role};
use replicator::protocol::{
    disk_payloads, epoch_frames as frames_of, CheckpointState, DiskRecord, Message, PageBatch,
    PageStager, SyncPlan, CHECKPOINT_STATE_VERSION, PAGE_SIZE, SYNC_PLAN_VERSION,
};
use replicator::standby::{stand_by, Replica, StandbyConfig};
use replicator::status::StatusBoard;
use tokio::net::TcpStream;

pub const WITHIN: Duration = Duration::from_secs(10);
pub const MEM_MIB: u64 = 16;
pub const DISK_BYTES: u64 = 1 << 20;

pub fn pair_secret() -> PairSecret {
    PairSecret::new(b"standby-session-test-pair-secret".to_vec()).unwrap()
}

thread_local! {
    /// Links made on this thread are plaintext (see [`plaintext_links`]).
    static PLAINTEXT_LINKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The links this test makes from now on (its standby's and its
/// primary's) are plaintext, for a relay that must see the frames (the
/// replication protocol's own checks); sealed otherwise. Per test: a
/// `#[tokio::test]` runs on a thread of its own, its tasks included.
pub fn plaintext_links() {
    PLAINTEXT_LINKS.with(|p| p.set(true));
}

pub fn link_config(role: Role) -> LinkConfig {
    let hello = Hello::new(
        format!("test-{role}"),
        role,
        CpuFeatureSummary {
            name: "x86-64-v2".into(),
            words: vec![1, 2, 3],
        },
        "test-vm",
    );
    let mut c = LinkConfig::new(pair_secret(), hello);
    c.heartbeat_interval = Duration::from_millis(50);
    c.heartbeat_timeout = Duration::from_millis(400);
    // These tests cut paths with TCP relays; pulses (UDP, straight to the
    // peer) would go around them. ft-link's own tests cover pulses.
    c.pulses = false;
    if PLAINTEXT_LINKS.with(|p| p.get()) {
        c.protection = ft_link::seal::Protection::Plaintext;
    }
    c
}

/// A checkpoint state (no vCPUs: the standby never runs it here).
pub fn checkpoint_state() -> CheckpointState {
    CheckpointState {
        version: CHECKPOINT_STATE_VERSION,
        machine: minimal_machine(),
        guest_ipv4: vec![[10, 77, 0, 100]],
        digest: None,
        inbound_through: vec![],
    }
}

/// [`checkpoint_state`] encoded, as an `EpochBegin` carries it.
pub fn state_payload() -> Bytes {
    Bytes::from(checkpoint_state().to_payload().unwrap())
}

pub fn minimal_machine() -> vmm::snapshot::MachineState {
    use vmm::snapshot::{FeatureSet, SerialDeviceState, VmState, SERIAL_STATE_VERSION};
    vmm::snapshot::MachineState {
        version: vmm::snapshot::MACHINE_STATE_VERSION,
        captured_unix_ns: 0,
        vcpu_count: 1,
        mem_mib: MEM_MIB,
        msr_indices: vec![],
        cpu_features: FeatureSet::X86_64V2,
        vcpus: vec![],
        vm: VmState {
            version: 1,
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        serial: SerialDeviceState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low: 0,
            baud_divisor_high: 0,
            interrupt_enable: 0,
            interrupt_identification: 0,
            line_control: 0,
            line_status: 0,
            modem_control: 0,
            modem_status: 0,
            scratch: 0,
            in_buffer: vec![],
        },
        virtio: vec![],
    }
}

/// Epoch `n`: page 5 filled with `fill`, plus one disk write at 512.
pub fn epoch_frames(n: u64, fill: u8, disk_text: &'static [u8]) -> Vec<Frame> {
    epoch_frames_of(n, 1, fill, disk_text)
}

/// [`epoch_frames`] at `generation`.
pub fn epoch_frames_of(n: u64, generation: u64, fill: u8, disk_text: &'static [u8]) -> Vec<Frame> {
    let mut stager = PageStager::default();
    vmm::replication::PageSink::page_buffer(&mut stager, 5 * PAGE_SIZE as u64)
        .extend_from_slice(&[fill; PAGE_SIZE]);
    let writes = disk_payloads([DiskRecord {
        disk: 0,
        offset: 512,
        data: Bytes::from_static(disk_text),
    }]);
    frames_of(n, generation, state_payload(), stager.finish(), writes)
}

pub struct Standby {
    pub addr: SocketAddr,
    /// A second listen address (the backup path).
    pub addr2: SocketAddr,
    pub status: StatusBoard,
    pub task: tokio::task::JoinHandle<Result<Replica, ft_link::LinkError>>,
    /// The operator's forced takeover.
    pub force: std::sync::Arc<tokio::sync::Notify>,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn start_standby(name: &str) -> Standby {
    start_standby_with(name, 1, None).await
}

/// A standby that refuses generations below `min_generation` and asks
/// `witness` (if any) before a takeover.
pub async fn start_standby_with(
    name: &str,
    min_generation: u64,
    witness: Option<replicator::quorum::WitnessConfig>,
) -> Standby {
    start_standby_on(name, min_generation, witness, None).await
}

/// [`start_standby_with`], its replica disk at `disk` when given (else in
/// its temporary folder).
pub async fn start_standby_on(
    name: &str,
    min_generation: u64,
    witness: Option<replicator::quorum::WitnessConfig>,
    disk: Option<std::path::PathBuf>,
) -> Standby {
    let dir = std::env::temp_dir().join(format!("ft-standby-test-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = disk.unwrap_or_else(|| dir.join("disk.img"));
    // Free ports (bound and released; the standby binds them again).
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (addr, addr2) = (free(), free());
    let config = StandbyConfig {
        listen: vec![addr.to_string(), addr2.to_string()],
        link: link_config(Role::Standby),
        disks: vec![disk],
        // Kept across sessions, as on a node.
        ram_file: Some(dir.join("guest.ram")),
        // One NIC (its TAP is used only by a promotion, which these tests
        // do not run).
        taps: vec!["ftt-unused0".into()],
        min_generation,
        witness,
        force_takeover: Default::default(),
    };
    let force = std::sync::Arc::clone(&config.force_takeover);
    let status = StatusBoard::new("test-standby", replicator::status::Role::Standby);
    let board = status.clone();
    let task = tokio::spawn(async move { stand_by(&config, &board).await });
    // Wait for it to listen.
    for _ in 0..100 {
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Standby {
        addr,
        addr2,
        status,
        task,
        force,
        _dir: TempDir(dir),
    }
}

pub async fn send(link: &Link, frames: &[Frame]) {
    for f in frames {
        link.send(f).await.expect("send");
    }
}

/// Connects as the primary and sends the synchronisation (page 5 = 0x11).
pub async fn synced_primary(addr: SocketAddr) -> Link {
    synced_primary_of(addr, 1).await
}

/// A synchronised primary whose epoch 1 (page 5 = 0x22, "one" on the disk
/// at 512) the standby committed and acknowledged.
pub async fn committed_primary(addr: SocketAddr) -> Link {
    let mut link = synced_primary(addr).await;
    send(&link, &epoch_frames(1, 0x22, b"one")).await;
    expect_ack(&mut link, 1).await;
    link
}

/// [`synced_primary`] at `generation`.
pub async fn synced_primary_of(addr: SocketAddr, generation: u64) -> Link {
    let mut link = primary_beginning(addr, generation).await;
    expect_held(&mut link).await;
    let mut page = vec![0x11u8; 8 + PAGE_SIZE];
    page[..8].copy_from_slice(&(5 * PAGE_SIZE as u64).to_le_bytes());
    let batch = PageBatch::new(Bytes::from(page)).unwrap();
    let end = sync_end(&[&batch]);
    send(
        &link,
        &[
            Message::SyncPages(batch).into_frame(0, generation),
            end.into_frame(0, generation),
        ],
    )
    .await;
    link
}

/// A backup path from a primary in session to `addr` (its `Backup`
/// message sent, and a moment for the standby to take it on).
pub async fn backup_path(addr: SocketAddr) -> Link {
    let backup = Link::connect(addr, &link_config(Role::Primary))
        .await
        .expect("backup path");
    backup
        .send(&Message::Backup.into_frame(0, 1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    backup
}

/// The initial copy's end record for `pages` (no disk records).
pub fn sync_end(pages: &[&PageBatch]) -> Message {
    let mut tally = replicator::protocol::EndTally::default();
    for batch in pages {
        tally.add_pages(batch);
    }
    Message::SyncEnd(tally.end())
}

/// Connects as the primary and begins a session at `generation` (its plan
/// only).
pub async fn primary_beginning(addr: SocketAddr, generation: u64) -> Link {
    primary_planning(addr, generation, DISK_BYTES).await
}

/// [`primary_beginning`] with a disk of `disk_bytes`.
pub async fn primary_planning(addr: SocketAddr, generation: u64, disk_bytes: u64) -> Link {
    primary_planning_at(addr, generation, disk_bytes, None).await
}

/// The boot plan of the test primaries at level HA.
pub fn test_boot_plan() -> replicator::protocol::BootPlan {
    replicator::protocol::BootPlan {
        vcpus: 1,
        mem_mib: MEM_MIB,
        kernel: "/images/vmlinux".into(),
        initrd: None,
        cmdline: "console=ttyS0".into(),
        macs: vec![[0x52, 0x54, 0, 0x12, 0x34, 0x56]],
    }
}

/// [`primary_planning`] at level HA when `boot` is given.
pub async fn primary_planning_at(
    addr: SocketAddr,
    generation: u64,
    disk_bytes: u64,
    boot: Option<replicator::protocol::BootPlan>,
) -> Link {
    primary_planning_mapped(addr, generation, disk_bytes, boot, (Vec::new(), None)).await
}

/// The primary's written maps and the session's next common point, in a
/// plan.
pub type PlanMaps = (
    Vec<Option<replicator::protocol::WrittenPlan>>,
    Option<String>,
);

/// [`primary_planning_at`] with the primary's written maps and the
/// session's next common point in the plan.
pub async fn primary_planning_mapped(
    addr: SocketAddr,
    generation: u64,
    disk_bytes: u64,
    boot: Option<replicator::protocol::BootPlan>,
    (written, next_common): PlanMaps,
) -> Link {
    let plan = test_plan(disk_bytes, boot, (written, next_common));
    primary_with_plan(addr, generation, plan).await
}

/// Connects as the primary and begins a session at `generation` with
/// `plan`.
pub async fn primary_with_plan(addr: SocketAddr, generation: u64, plan: SyncPlan) -> Link {
    let link = tokio::time::timeout(WITHIN, Link::connect(addr, &link_config(Role::Primary)))
        .await
        .expect("connect in time")
        .expect("handshake");
    send(
        &link,
        &[Message::SyncBegin(Box::new(plan)).into_frame(0, generation)],
    )
    .await;
    link
}

/// The test primaries' plan (level HA when `boot` is given), with no
/// memory lineage.
pub fn test_plan(
    disk_bytes: u64,
    boot: Option<replicator::protocol::BootPlan>,
    (written, next_common): PlanMaps,
) -> SyncPlan {
    SyncPlan {
        version: SYNC_PLAN_VERSION,
        mem_mib: MEM_MIB,
        disk_bytes: vec![disk_bytes],
        nics: 1,
        content_key: test_key().to_hex(),
        level: if boot.is_some() {
            replicator::level::Level::Ha
        } else {
            replicator::level::Level::Ft
        },
        boot,
        written,
        next_common,
        memory_lineage: None,
        memory_since: None,
    }
}

/// The content key of the test primaries' sessions.
pub fn test_key() -> replicator::content::ContentKey {
    replicator::content::ContentKey([0x5a; 32])
}

/// The standby's word on what it holds of the (one) disk and of memory,
/// which follows the plan: new memory first (before the disk is read, so
/// the primary stops digesting its own), kept memory after the disk.
pub async fn expect_held(
    link: &mut Link,
) -> (
    replicator::protocol::HeldPart,
    replicator::protocol::HeldPart,
) {
    use replicator::protocol::{HeldPart, Region};
    let first = next_held(link).await;
    let (disk, memory) = if first.region == Region::Memory {
        (next_held(link).await, first)
    } else {
        let memory = next_held(link).await;
        assert!(
            memory.part != HeldPart::Zeroed,
            "new memory was said after the disk"
        );
        (first, memory)
    };
    assert_eq!(disk.region, Region::Disk(0));
    assert_eq!(memory.region, Region::Memory);
    (disk.part, memory.part)
}

pub async fn next_held(link: &mut Link) -> replicator::protocol::Held {
    let f = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the standby says what it holds in time")
        .expect("the link stays up");
    match Message::from_frame(f)
        .expect("a replication message")
        .message
    {
        Message::SyncHeld(held) => held,
        other => panic!("{} instead of what the standby holds", other.name()),
    }
}

pub async fn expect_ack(link: &mut Link, epoch: u64) {
    let f = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("an answer in time")
        .expect("the link stays up");
    let envelope = Message::from_frame(f).expect("a replication message");
    assert_eq!((envelope.message, envelope.epoch), (Message::Ack, epoch));
}

/// Waits until the standby's status satisfies `check`.
pub async fn until(
    standby: &Standby,
    what: &str,
    check: impl Fn(&replicator::status::Status) -> bool,
) {
    let start = std::time::Instant::now();
    loop {
        let status = standby.status.snapshot();
        if check(&status) {
            return;
        }
        assert!(
            start.elapsed() < WITHIN,
            "the standby never got to: {what}; its status: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A session whose epoch 1 the standby committed, ended by the primary's
/// `Stop` (its VM stopped on purpose): returns once the standby says so.
pub async fn stopped_session(standby: &Standby) {
    let link = committed_primary(standby.addr).await;
    send(&link, &[Message::Stop.into_frame(2, 1)]).await;
    drop(link);
    until(standby, "the session ended by Stop", |s| {
        s.message
            .as_deref()
            .is_some_and(|m| m.contains("stopped on purpose"))
    })
    .await;
}

/// The replica the standby hands over for promotion (within [`WITHIN`]).
pub async fn taken_over(
    task: tokio::task::JoinHandle<Result<Replica, ft_link::LinkError>>,
) -> Replica {
    tokio::time::timeout(WITHIN, task)
        .await
        .expect("the standby takes over in time")
        .expect("the standby's task")
        .expect("a replica to promote")
}

pub fn page5(replica: &Replica) -> u8 {
    let mut page = vec![0u8; PAGE_SIZE];
    replica
        .checkpoint()
        .expect("a checkpoint")
        .ram
        .read_page(5 * PAGE_SIZE as u64, &mut page)
        .unwrap();
    page[100]
}

pub fn disk_at_512(replica: &Replica, len: usize) -> Vec<u8> {
    let data = std::fs::read(&replica.disks[0].path).unwrap();
    data[512..512 + len].to_vec()
}

/// Mirror epoch `n`: `text` written at `offset` of disk 0, no state, no
/// pages.
pub fn mirror_epoch(n: u64, offset: u64, text: &'static [u8]) -> Vec<Frame> {
    let writes = disk_payloads([DiskRecord {
        disk: 0,
        offset,
        data: Bytes::from_static(text),
    }]);
    frames_of(n, 1, Bytes::new(), Default::default(), writes)
}

/// A primary at level HA whose initial copy (one disk record at 0) the
/// standby accepted.
pub async fn mirrored_primary(standby: &Standby) -> Link {
    let mut link = primary_planning_at(standby.addr, 1, DISK_BYTES, Some(test_boot_plan())).await;
    // Its disk alone: nothing about memory follows.
    let held = next_held(&mut link).await;
    assert_eq!(held.region, replicator::protocol::Region::Disk(0));
    let (batches, _) = disk_payloads([DiskRecord {
        disk: 0,
        offset: 0,
        data: Bytes::from_static(b"copied"),
    }]);
    let mut tally = replicator::protocol::EndTally::default();
    for batch in &batches {
        tally.add_disk(batch);
    }
    let mut frames: Vec<_> = batches
        .into_iter()
        .map(|b| Message::SyncDisk(b).into_frame(0, 1))
        .collect();
    frames.push(Message::SyncEnd(tally.end()).into_frame(0, 1));
    send(&link, &frames).await;
    link
}
