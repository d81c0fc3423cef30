//! Benchmark: the host-side checkpoint pipeline without a guest. For each
//! epoch: copy the dirty pages of a 256 MiB guest memory into frame payloads
//! (capture, as the primary does while the guest is stopped), build the
//! epoch's frames and end record (encode), send them over a real,
//! authenticated A-link on loopback TCP, assemble and check them on the
//! standby and apply them to the replica's memory. Prints pages per
//! millisecond next to this machine's memcpy rate measured in the same run,
//! and checks that the replica ends equal to the primary. Runs twice: on a
//! sealed A-link (the default) and on a plaintext one, and prints what
//! sealing costs. Each run goes epoch by epoch (the stages timed one after
//! the other), then pipelined as the engine runs (up to
//! [`DEFAULT_EPOCHS_IN_FLIGHT`] epochs sent before their acknowledgements,
//! so the primary's capture and send overlap the standby's work; timed on
//! the wall clock, the guest's own writes left out).
//!
//! Run: `cargo bench -p replicator --bench pipeline`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use ft_link::auth::PairSecret;
use ft_link::hello::{CpuFeatureSummary, Hello, Role};
use ft_link::link::{Link, LinkConfig, LinkListener};
use ft_link::seal::Protection;
use replicator::assembler::EpochAssembler;
use replicator::checkpoint_bench::memcpy_ns_per_page;
use replicator::primary::DEFAULT_EPOCHS_IN_FLIGHT;
use replicator::protocol::{epoch_frames, Message, PageStager, PAGE_SIZE};
use vmm::replication::ReplicaRam;

const MEM_MIB: u64 = 256;
const EPOCHS: u64 = 60;
const PAGES_PER_EPOCH: usize = 2000;

fn config(role: Role, protection: Protection) -> LinkConfig {
    let hello = Hello::new(
        format!("bench-{role}"),
        role,
        CpuFeatureSummary {
            name: "x86-64-v2".into(),
            words: vec![1, 2, 3],
        },
        "bench-vm",
    );
    let mut config = LinkConfig::new(
        PairSecret::new(b"pipeline-benchmark-pair-secret!!".to_vec()).expect("secret"),
        hello,
    );
    config.protection = protection;
    config
}

/// A reproducible choice of distinct page numbers, in address order (as a
/// harvest gives them).
fn dirty_set(epoch: u64, total_pages: u64) -> Vec<u64> {
    let mut words = vec![0u64; total_pages.div_ceil(64) as usize];
    let mut x = epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut chosen = 0;
    while chosen < PAGES_PER_EPOCH {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = x % total_pages;
        let (w, b) = ((page / 64) as usize, page % 64);
        if words[w] & (1 << b) == 0 {
            words[w] |= 1 << b;
            chosen += 1;
        }
    }
    (0..total_pages)
        .filter(|&p| words[(p / 64) as usize] & (1 << (p % 64)) != 0)
        .collect()
}

/// What one run measured.
struct Figures {
    pages_sent: u64,
    capture: Duration,
    encode: Duration,
    round_trip: Duration,
    total: Duration,
    /// The same epochs pipelined: wall time, the guest's writes left out.
    pipelined: Duration,
}

impl Figures {
    fn per_ms(&self, d: Duration) -> f64 {
        self.pages_sent as f64 / (d.as_secs_f64() * 1e3)
    }

    fn whole(&self) -> f64 {
        self.per_ms(self.capture + self.encode + self.round_trip)
    }

    fn whole_pipelined(&self) -> f64 {
        self.per_ms(self.pipelined)
    }
}

#[tokio::main]
async fn main() {
    // As the engine's process does (`ftprotect`).
    assert!(
        replicator::heap::keep_freed_memory(),
        "the allocator's settings"
    );
    let sealed = run(Protection::Sealed).await;
    let plaintext = run(Protection::Plaintext).await;
    let memcpy_ns = memcpy_ns_per_page(256);
    let memcpy_per_ms = 1e6 / memcpy_ns;
    println!(
        "pipeline: {EPOCHS} epochs x {PAGES_PER_EPOCH} pages of a {MEM_MIB} MiB memory, replica verified equal"
    );
    println!("  memcpy (same run)            {memcpy_per_ms:>10.0} pages/ms");
    for (name, f) in [("sealed", &sealed), ("plaintext", &plaintext)] {
        println!("  A-link {name}:");
        println!(
            "    capture (copy into frames)   {:>10.0} pages/ms  ({:.2} of memcpy)",
            f.per_ms(f.capture),
            f.per_ms(f.capture) / memcpy_per_ms
        );
        println!(
            "    encode (epoch crc32, frames) {:>10.0} pages/ms  ({:.2} of memcpy)",
            f.per_ms(f.encode),
            f.per_ms(f.encode) / memcpy_per_ms
        );
        println!(
            "    send (seal or frame crc32, TCP) + standby open/check + apply + ack {:>10.0} pages/ms  ({:.2} of memcpy)",
            f.per_ms(f.round_trip),
            f.per_ms(f.round_trip) / memcpy_per_ms
        );
        println!(
            "    whole pipeline               {:>10.0} pages/ms  ({:.2} of memcpy), {:.2} ms per epoch",
            f.whole(),
            f.whole() / memcpy_per_ms,
            f.total.as_secs_f64() * 1e3 / EPOCHS as f64
        );
        println!(
            "    whole pipeline, pipelined ({DEFAULT_EPOCHS_IN_FLIGHT} in flight) {:>10.0} pages/ms  ({:.2} of memcpy), {:.2} ms per epoch",
            f.whole_pipelined(),
            f.whole_pipelined() / memcpy_per_ms,
            f.pipelined.as_secs_f64() * 1e3 / EPOCHS as f64
        );
    }
    println!(
        "  sealing costs {:.1}% of the pipeline's rate epoch by epoch, {:.1}% pipelined ({}; goal: under 15%)",
        (1.0 - sealed.whole() / plaintext.whole()) * 100.0,
        (1.0 - sealed.whole_pipelined() / plaintext.whole_pipelined()) * 100.0,
        Protection::Sealed.describe()
    );
}

async fn run(protection: Protection) -> Figures {
    let primary = ReplicaRam::create(MEM_MIB).expect("primary memory");
    let replica = ReplicaRam::create(MEM_MIB).expect("replica memory");
    let total_pages = (MEM_MIB << 20) / PAGE_SIZE as u64;

    let listener = LinkListener::bind("127.0.0.1:0", config(Role::Standby, protection))
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Both runs' epochs, on one link.
    let standby = tokio::spawn(async move {
        let mut link = listener.accept().await.expect("accept");
        let mut assembler = EpochAssembler::new(1);
        let mut applied = 0u64;
        while applied < 2 * EPOCHS {
            let frame = link.recv().await.expect("recv");
            let message = Message::from_frame(frame).expect("a good message");
            if let Some(epoch) = assembler.on_message(message).expect("a good epoch") {
                assembler.apply(&epoch, &replica, &[]).expect("apply");
                link.send(&Message::Ack.into_frame(epoch.epoch, 1))
                    .await
                    .expect("ack");
                applied += 1;
            }
        }
        replica
    });
    let link = Link::connect(addr, &config(Role::Primary, protection))
        .await
        .expect("connect");
    let (tx, mut rx) = link.split();

    // Epoch by epoch: each stage timed, the acknowledgement awaited.
    let (mut capture, mut encode_time, mut round_trip) =
        (Duration::ZERO, Duration::ZERO, Duration::ZERO);
    let mut pages_sent = 0u64;
    let start = Instant::now();
    for epoch in 1..=EPOCHS {
        let dirty = guest_writes(&primary, epoch, total_pages);
        let t = Instant::now();
        let (frames, count) = capture_and_encode(&primary, epoch, dirty, &mut encode_time);
        capture += t.elapsed();
        let t = Instant::now();
        for f in &frames {
            tx.send(f).await.expect("send");
        }
        assert_eq!(next_ack(&mut rx).await, epoch);
        round_trip += t.elapsed();
        pages_sent += count;
    }
    let total = start.elapsed();
    capture -= encode_time;

    // Pipelined: the next epoch captured and sent while earlier ones await
    // their acknowledgements.
    let mut in_flight = std::collections::VecDeque::new();
    let mut writing = Duration::ZERO;
    let start = Instant::now();
    for epoch in EPOCHS + 1..=2 * EPOCHS {
        if in_flight.len() >= DEFAULT_EPOCHS_IN_FLIGHT {
            let oldest = in_flight.pop_front();
            assert_eq!(Some(next_ack(&mut rx).await), oldest);
        }
        let t = Instant::now();
        let dirty = guest_writes(&primary, epoch, total_pages);
        writing += t.elapsed();
        let mut unused = Duration::ZERO;
        let (frames, _) = capture_and_encode(&primary, epoch, dirty, &mut unused);
        for f in &frames {
            tx.send(f).await.expect("send");
        }
        in_flight.push_back(epoch);
    }
    while let Some(oldest) = in_flight.pop_front() {
        assert_eq!(next_ack(&mut rx).await, oldest);
    }
    let pipelined = start.elapsed() - writing;
    let replica = standby.await.expect("standby");

    // The replica must equal the primary.
    let mut a = vec![0u8; PAGE_SIZE];
    let mut b = vec![0u8; PAGE_SIZE];
    for page in 0..total_pages {
        let gpa = page * PAGE_SIZE as u64;
        primary.read_page(gpa, &mut a).unwrap();
        replica.read_page(gpa, &mut b).unwrap();
        assert_eq!(a, b, "page {page} differs between primary and replica");
    }

    Figures {
        pages_sent,
        capture,
        encode: encode_time,
        round_trip,
        total,
        pipelined,
    }
}

/// The epoch the standby acknowledges next.
async fn next_ack(rx: &mut ft_link::LinkReceiver) -> u64 {
    loop {
        let ack = Message::from_frame(rx.recv().await.expect("ack")).expect("a message");
        if ack.message == Message::Ack {
            return ack.epoch;
        }
    }
}

/// The guest "writes" epoch `epoch`'s pages; returns them.
fn guest_writes(primary: &ReplicaRam, epoch: u64, total_pages: u64) -> Vec<u64> {
    let dirty = dirty_set(epoch, total_pages);
    for &page in &dirty {
        let mut contents = [0u8; PAGE_SIZE];
        contents[..8].copy_from_slice(&(epoch ^ page).to_le_bytes());
        primary
            .write_page(page * PAGE_SIZE as u64, &contents)
            .expect("write");
    }
    dirty
}

/// Capture as the primary does while the guest is stopped (dirty pages
/// copied straight into frame payloads), then, after the guest resumes,
/// the epoch's frames and end record (timed into `encode`); returns the
/// frames and the pages.
fn capture_and_encode(
    primary: &ReplicaRam,
    epoch: u64,
    dirty: Vec<u64>,
    encode: &mut Duration,
) -> (Vec<ft_link::Frame>, u64) {
    let mut stager = PageStager::default();
    primary.stage_pages(dirty, &mut stager).expect("stage");
    let pages = stager.finish();
    let count = pages.count;
    let t = Instant::now();
    let frames = epoch_frames(
        epoch,
        1,
        Bytes::from_static(b"vcpu and device state"),
        pages,
        (Vec::new(), 0),
    );
    *encode += t.elapsed();
    (frames, count)
}
