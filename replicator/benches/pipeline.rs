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
//! the wall clock, with the guest's writes' time taken out (an upper
//! bound: the standby works on meanwhile) and counted (a lower bound)). The
//! two kinds of run alternate (A B B A), [`RUNS`] times each, with a bare
//! loopback TCP stream of the pages' bytes, used two ways (what the wire
//! here carries, the pipeline's other limit, is the better of the two; the
//! pipeline also carries frame headers and, sealed, tags); each figure
//! printed is the median. The pipelined run
//! also prints the CPU time the process used (both ends and the guest's
//! writes) as a share of what the machine's cores had in its wall time:
//! near 1, the run is bound by this machine's CPUs, which carry both
//! nodes' work here. Beside the rates: sealing and opening timed alone,
//! and this machine's limit for a sealed pipeline by an estimate from the
//! same run ([`MachineLimit`]), with each pipelined rate as a share of it.
//!
//! Run: `cargo bench -p replicator --bench pipeline`.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ft_link::auth::{PairSecret, Side};
use ft_link::frame::HEADER_LEN;
use ft_link::hello::{CpuFeatureSummary, Hello, Role};
use ft_link::link::{Link, LinkConfig, LinkListener};
use ft_link::seal::{KeyExchange, Protection, RECORD_OVERHEAD, RECORD_PLAIN_MAX};
use replicator::assembler::EpochAssembler;
use replicator::checkpoint_bench::memcpy_ns_per_page;
use replicator::primary::DEFAULT_EPOCHS_IN_FLIGHT;
use replicator::protocol::{
    epoch_frames, Message, PageStager, PAGES_PER_FRAME, PAGE_RECORD, PAGE_SIZE,
};
use vmm::replication::ReplicaRam;

const MEM_MIB: u64 = 256;
const EPOCHS: u64 = 60;
const PAGES_PER_EPOCH: usize = 2000;

/// The pair secret both ends of the bench's links share.
fn pair_secret() -> PairSecret {
    PairSecret::new(b"pipeline-benchmark-pair-secret!!".to_vec()).expect("secret")
}

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
    let mut config = LinkConfig::new(pair_secret(), hello);
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
    /// The same epochs pipelined: wall time, the guest's writes included.
    pipelined_wall: Duration,
    /// The part of it the guest's writes took (on the primary's side; the
    /// standby's work goes on meanwhile).
    writing: Duration,
    /// The CPU time both ends (this one process) used in `pipelined_wall`.
    pipelined_cpu: Duration,
}

impl Figures {
    fn per_ms(&self, d: Duration) -> f64 {
        self.pages_sent as f64 / (d.as_secs_f64() * 1e3)
    }

    /// The rates (pages/ms) and time per epoch this run gives.
    fn rates(&self) -> Rates {
        Rates {
            capture: self.per_ms(self.capture),
            encode: self.per_ms(self.encode),
            round_trip: self.per_ms(self.round_trip),
            whole: self.per_ms(self.capture + self.encode + self.round_trip),
            pipelined: self.per_ms(self.pipelined_wall - self.writing),
            pipelined_with_writes: self.per_ms(self.pipelined_wall),
            ms_per_epoch: self.total.as_secs_f64() * 1e3 / EPOCHS as f64,
            pipelined_ms_per_epoch: (self.pipelined_wall - self.writing).as_secs_f64() * 1e3
                / EPOCHS as f64,
            pipelined_cpu_ms_per_epoch: self.pipelined_cpu.as_secs_f64() * 1e3 / EPOCHS as f64,
            cpu_share: self.pipelined_cpu.as_secs_f64()
                / (self.pipelined_wall.as_secs_f64() * cores() as f64),
        }
    }
}

/// One run's figures as rates, or the median of several runs'.
#[derive(Clone, Copy)]
struct Rates {
    capture: f64,
    encode: f64,
    round_trip: f64,
    whole: f64,
    /// The guest's writes' time taken out (the standby's work during
    /// them is then not counted: an upper bound).
    pipelined: f64,
    /// The guest's writes' time counted (a lower bound).
    pipelined_with_writes: f64,
    ms_per_epoch: f64,
    pipelined_ms_per_epoch: f64,
    pipelined_cpu_ms_per_epoch: f64,
    /// CPU time used / CPU time the cores had, pipelined.
    cpu_share: f64,
}

impl Rates {
    /// Each figure's median over `runs` (taken figure by figure).
    fn median(runs: &[Rates]) -> Rates {
        let m = |f: fn(&Rates) -> f64| median(runs.iter().map(f).collect());
        Rates {
            capture: m(|r| r.capture),
            encode: m(|r| r.encode),
            round_trip: m(|r| r.round_trip),
            whole: m(|r| r.whole),
            pipelined: m(|r| r.pipelined),
            pipelined_with_writes: m(|r| r.pipelined_with_writes),
            ms_per_epoch: m(|r| r.ms_per_epoch),
            pipelined_ms_per_epoch: m(|r| r.pipelined_ms_per_epoch),
            pipelined_cpu_ms_per_epoch: m(|r| r.pipelined_cpu_ms_per_epoch),
            cpu_share: m(|r| r.cpu_share),
        }
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

/// The goal for the whole pipeline, sealed, as a share of memcpy.
const PIPELINE_GOAL: f64 = 0.3;

/// Runs of each kind, alternated so that a noisy spell of the machine
/// does not fall on one kind only; each figure printed is the median.
const RUNS: usize = 3;

#[tokio::main]
async fn main() {
    // As the engine's process does (`ftprotect`).
    assert!(
        replicator::heap::keep_freed_memory(),
        "the allocator's settings"
    );
    let (mut sealed, mut plaintext) = (Vec::new(), Vec::new());
    let (mut tcp_default, mut tcp_tuned, mut seal_costs) = (Vec::new(), Vec::new(), Vec::new());
    // A B B A ...: neither kind always runs first (on a colder machine).
    for i in 0..RUNS {
        if i % 2 == 0 {
            sealed.push(run(Protection::Sealed).await.rates());
            plaintext.push(run(Protection::Plaintext).await.rates());
        } else {
            plaintext.push(run(Protection::Plaintext).await.rates());
            sealed.push(run(Protection::Sealed).await.rates());
        }
        tcp_default.push(loopback_tcp(DEFAULT_STREAM));
        tcp_tuned.push(loopback_tcp(TUNED_STREAM));
        seal_costs.push(SealCost::measure());
    }
    let (sealed, plaintext) = (Rates::median(&sealed), Rates::median(&plaintext));
    let (tcp_default, tcp_tuned) = (
        StreamFigures::median(&tcp_default),
        StreamFigures::median(&tcp_tuned),
    );
    let seal = SealCost::median(&seal_costs);
    // What one stream carries here: the better of the two ways to use it.
    let tcp = tcp_default.pages_per_ms.max(tcp_tuned.pages_per_ms);
    let memcpy_ns = memcpy_ns_per_page(256);
    let memcpy_per_ms = 1e6 / memcpy_ns;
    let cores = cores();
    let wire_share = tcp / memcpy_per_ms;
    let limit = MachineLimit::new(
        tcp_default.cpu_ns_per_page.min(tcp_tuned.cpu_ns_per_page),
        memcpy_ns,
        seal,
        cores,
        tcp,
    );
    println!(
        "pipeline: {EPOCHS} epochs x {PAGES_PER_EPOCH} pages of a {MEM_MIB} MiB memory (populated, as after the initial copy), replica verified equal; medians of {RUNS} runs"
    );
    println!("  memcpy (same run)            {memcpy_per_ms:>10.0} pages/ms");
    for (stream, figures) in [(DEFAULT_STREAM, tcp_default), (TUNED_STREAM, tcp_tuned)] {
        println!(
            "  one loopback TCP stream (same run, bytes only; {}) {:>10.0} pages/ms  ({:.2} of memcpy), CPU {:.0} ns per page (both ends)",
            stream.describe(),
            figures.pages_per_ms,
            figures.pages_per_ms / memcpy_per_ms,
            figures.cpu_ns_per_page
        );
    }
    println!(
        "  sealing and opening (same run, AES-256-GCM, the link's own code, one thread) {:>10.0} pages/ms ({:.0} ns per page sealing, {:.0} opening)",
        1e6 / (seal.seal_ns + seal.open_ns),
        seal.seal_ns,
        seal.open_ns
    );
    println!(
        "  this machine's limit for a sealed pipeline, by an estimate from this run: {:.0} pages/ms ({:.2} of memcpy), bound by {}: the work no pipeline can leave out, each part's CPU time measured alone ({:.0} ns per page: the stream's {:.0}, two copies (capture, apply) {:.0}, sealing and opening {:.0}), spread perfectly over all {cores} CPUs, no faster than the stream, nor than one thread seals or opens (optimistic: nothing else counted)",
        limit.pages_per_ms,
        limit.pages_per_ms / memcpy_per_ms,
        limit.binding,
        limit.cpu_ns,
        limit.stream_cpu_ns,
        2.0 * limit.memcpy_ns,
        limit.seal.seal_ns + limit.seal.open_ns
    );
    for (name, r) in [("sealed", &sealed), ("plaintext", &plaintext)] {
        println!("  A-link {name}:");
        println!(
            "    capture (copy into frames)   {:>10.0} pages/ms  ({:.2} of memcpy)",
            r.capture,
            r.capture / memcpy_per_ms
        );
        println!(
            "    encode (epoch crc32, frames) {:>10.0} pages/ms  ({:.2} of memcpy)",
            r.encode,
            r.encode / memcpy_per_ms
        );
        println!(
            "    send (seal or frame crc32, TCP) + standby open/check + apply + ack {:>10.0} pages/ms  ({:.2} of memcpy, {:.2} of loopback TCP)",
            r.round_trip,
            r.round_trip / memcpy_per_ms,
            r.round_trip / tcp
        );
        println!(
            "    whole pipeline               {:>10.0} pages/ms  ({:.2} of memcpy), {:.2} ms per epoch",
            r.whole,
            r.whole / memcpy_per_ms,
            r.ms_per_epoch
        );
        println!(
            "    whole pipeline, pipelined ({DEFAULT_EPOCHS_IN_FLIGHT} in flight) {:>10.0} pages/ms  ({:.2} of memcpy, {:.2} of loopback TCP, {:.2} of the machine's limit), {:.2} ms per epoch; {:.0} pages/ms ({:.2} of memcpy) with the guest's writes' time counted",
            r.pipelined,
            r.pipelined / memcpy_per_ms,
            r.pipelined / tcp,
            r.pipelined / limit.pages_per_ms,
            r.pipelined_ms_per_epoch,
            r.pipelined_with_writes,
            r.pipelined_with_writes / memcpy_per_ms
        );
        println!(
            "      CPU, both ends and the guest's writes: {:.2} ms per epoch, {:.2} of what the {cores} cores had",
            r.pipelined_cpu_ms_per_epoch,
            r.cpu_share
        );
    }
    println!(
        "  goal: sealed, pipelined, at {PIPELINE_GOAL:.1} of memcpy; here {:.2}, {:.2} of what one loopback TCP stream carries, {:.2} of this machine's limit{}",
        sealed.pipelined / memcpy_per_ms,
        sealed.pipelined / tcp,
        sealed.pipelined / limit.pages_per_ms,
        if limit.pages_per_ms / memcpy_per_ms < PIPELINE_GOAL {
            format!(
                " (the goal is beyond this machine by the estimate: its limit is {:.2} of memcpy, bound by {}{})",
                limit.pages_per_ms / memcpy_per_ms,
                limit.binding,
                if wire_share < PIPELINE_GOAL && limit.binding != "the stream" {
                    format!("; one stream alone, bytes only, carries {wire_share:.2}")
                } else {
                    String::new()
                }
            )
        } else {
            String::new()
        }
    );
    println!(
        "  sealing costs {:.1}% of the pipeline's rate epoch by epoch, {:.1}% pipelined ({}; goal: under 15%)",
        (1.0 - sealed.whole / plaintext.whole) * 100.0,
        (1.0 - sealed.pipelined / plaintext.pipelined) * 100.0,
        Protection::Sealed.describe()
    );
}

/// The fastest a sealed pipeline could run here, by an estimate from the
/// same run: the work it cannot leave out (the stream's bytes through the
/// kernel, both ends; the capture's copy out of the guest's memory and the
/// apply's copy into the replica's; sealing and opening), each part's CPU
/// time measured alone, spread perfectly over the machine's CPUs (logical
/// ones; copies share one memory), no faster than the stream carries
/// bytes alone, and no faster than one thread seals or opens (a link has
/// one sealer and one opener). Optimistic: the parts may cost more
/// together than alone, and nothing else is counted.
struct MachineLimit {
    stream_cpu_ns: f64,
    memcpy_ns: f64,
    seal: SealCost,
    cpu_ns: f64,
    pages_per_ms: f64,
    /// Which of the three bounds binds.
    binding: &'static str,
}

impl MachineLimit {
    fn new(
        stream_cpu_ns: f64,
        memcpy_ns: f64,
        seal: SealCost,
        cores: usize,
        stream_pages_per_ms: f64,
    ) -> MachineLimit {
        let cpu_ns = stream_cpu_ns + 2.0 * memcpy_ns + seal.seal_ns + seal.open_ns;
        let bounds = [
            (cores as f64 * 1e6 / cpu_ns, "the CPUs"),
            (stream_pages_per_ms, "the stream"),
            (
                1e6 / seal.seal_ns.max(seal.open_ns),
                "one sealing or opening thread",
            ),
        ];
        let (pages_per_ms, binding) = bounds
            .into_iter()
            .min_by(|a, b| a.0.total_cmp(&b.0))
            .expect("three bounds");
        MachineLimit {
            stream_cpu_ns,
            memcpy_ns,
            seal,
            cpu_ns,
            pages_per_ms,
            binding,
        }
    }
}

/// How a bare TCP stream is used: the size of each write, and the socket
/// buffers both ends ask for (none: the kernel's, which it tunes).
#[derive(Clone, Copy)]
struct StreamUse {
    write: usize,
    socket_buffers: Option<usize>,
}

impl StreamUse {
    fn describe(self) -> String {
        let buffers = self
            .socket_buffers
            .map_or("the kernel's socket buffers".to_string(), |b| {
                format!(
                    "{} MiB socket buffers asked (the kernel caps them at net.core.[rw]mem_max)",
                    b >> 20
                )
            });
        format!("{} KiB writes, {buffers}", self.write >> 10)
    }
}

/// The reference runs until session 52: large writes, the kernel's buffers.
const DEFAULT_STREAM: StreamUse = StreamUse {
    write: 1 << 20,
    socket_buffers: None,
};
/// Writes the size of a page frame (64 pages) with large fixed socket
/// buffers: on this machine's loopback this often carries twice as much
/// (session 52: 4-5 GB/s against 7-10 GB/s, from run to run). The A-link
/// keeps the kernel's buffers: what suits loopback on two shared cores
/// says little about a NIC between two servers.
const TUNED_STREAM: StreamUse = StreamUse {
    write: 256 << 10,
    socket_buffers: Some(4 << 20),
};

/// What a bare stream did.
#[derive(Clone, Copy)]
struct StreamFigures {
    pages_per_ms: f64,
    /// The CPU time the writing and the reading thread took per page's
    /// bytes (their system time holds the kernel's work for them, but not
    /// what the kernel's own threads did: if anything, an underestimate).
    cpu_ns_per_page: f64,
}

impl StreamFigures {
    fn median(runs: &[StreamFigures]) -> StreamFigures {
        StreamFigures {
            pages_per_ms: median(runs.iter().map(|r| r.pages_per_ms).collect()),
            cpu_ns_per_page: median(runs.iter().map(|r| r.cpu_ns_per_page).collect()),
        }
    }
}

/// What one TCP stream over loopback carries on this machine, used as
/// `how`, and the CPU time it takes: as many bytes as the pipeline sends,
/// written and read (in 1 MiB reads) by two threads, nothing done with
/// them.
fn loopback_tcp(how: StreamUse) -> StreamFigures {
    use std::io::{Read, Write};
    let bytes = EPOCHS as usize * PAGES_PER_EPOCH * PAGE_SIZE;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let buffers = move |stream: &std::net::TcpStream| {
        if let Some(size) = how.socket_buffers {
            let socket = socket2::SockRef::from(stream);
            socket.set_send_buffer_size(size).expect("SO_SNDBUF");
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
    };
    let reader = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        buffers(&stream);
        let mut buf = vec![0u8; 1 << 20];
        let start_cpu = cpu_used(libc::RUSAGE_THREAD);
        let mut read = 0;
        while read < bytes {
            match stream.read(&mut buf).expect("read") {
                0 => panic!("the stream ended after {read} of {bytes} bytes"),
                n => read += n,
            }
        }
        (Instant::now(), cpu_used(libc::RUSAGE_THREAD) - start_cpu)
    });
    let mut stream = std::net::TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    buffers(&stream);
    let piece = vec![0x5au8; how.write];
    let start = Instant::now();
    let start_cpu = cpu_used(libc::RUSAGE_THREAD);
    let mut written = 0;
    while written < bytes {
        let n = piece.len().min(bytes - written);
        stream.write_all(&piece[..n]).expect("write");
        written += n;
    }
    let writer_cpu = cpu_used(libc::RUSAGE_THREAD) - start_cpu;
    let (done, reader_cpu) = reader.join().expect("reader");
    let cpu = writer_cpu + reader_cpu;
    let pages = (EPOCHS as usize * PAGES_PER_EPOCH) as f64;
    StreamFigures {
        pages_per_ms: pages / (done.duration_since(start).as_secs_f64() * 1e3),
        cpu_ns_per_page: cpu.as_nanos() as f64 / pages,
    }
}

/// What sealing and opening one page's bytes takes here (ns, on one
/// thread, CPU-bound: its wall time), with the link's own sealer and
/// opener on keys from a real key exchange, a page frame's payload at a
/// time (as the protocol lays it out), cut into records as the link cuts
/// them (the sealer's gather of the plaintext into the record included).
#[derive(Clone, Copy)]
struct SealCost {
    seal_ns: f64,
    open_ns: f64,
}

impl SealCost {
    fn measure() -> SealCost {
        const ROUNDS: usize = 256;
        let secret = pair_secret();
        let mut connecting = KeyExchange::new(&secret, Side::Connecting).expect("key exchange");
        let mut accepting = KeyExchange::new(&secret, Side::Accepting).expect("key exchange");
        accepting
            .read(&connecting.write().expect("first message"))
            .expect("first message read");
        connecting
            .read(&accepting.write().expect("answer"))
            .expect("answer read");
        let (mut sealer, _) = connecting.finish().expect("keys");
        let (_, mut opener) = accepting.finish().expect("keys");
        let header = [0x11u8; HEADER_LEN];
        let payload = vec![0x5au8; PAGES_PER_FRAME * PAGE_RECORD];
        let plain_len = header.len() + payload.len();
        let mut records = BytesMut::new();
        let (mut seal, mut open) = (Duration::ZERO, Duration::ZERO);
        // The first round warms up (not timed).
        for round in 0..=ROUNDS {
            records.clear();
            let t = Instant::now();
            sealer
                .seal_into(&[&header, &payload], &mut records)
                .expect("seal");
            let sealed = t.elapsed();
            let t = Instant::now();
            let (mut at, mut left) = (0, plain_len);
            while left > 0 {
                let plain = left.min(RECORD_PLAIN_MAX);
                let body = at + HEADER_LEN..at + HEADER_LEN + plain + RECORD_OVERHEAD;
                at = body.end;
                let opened = opener.open_in_place(&mut records[body]).expect("open");
                assert_eq!(opened, plain);
                left -= plain;
            }
            let opened = t.elapsed();
            assert_eq!(at, records.len(), "the records end where the frame does");
            if round > 0 {
                seal += sealed;
                open += opened;
            }
        }
        let pages = (ROUNDS * PAGES_PER_FRAME) as f64;
        SealCost {
            seal_ns: seal.as_nanos() as f64 / pages,
            open_ns: open.as_nanos() as f64 / pages,
        }
    }

    fn median(runs: &[SealCost]) -> SealCost {
        SealCost {
            seal_ns: median(runs.iter().map(|r| r.seal_ns).collect()),
            open_ns: median(runs.iter().map(|r| r.open_ns).collect()),
        }
    }
}

async fn run(protection: Protection) -> Figures {
    let primary = ReplicaRam::create(MEM_MIB).expect("primary memory");
    let replica = ReplicaRam::create(MEM_MIB).expect("replica memory");
    let total_pages = (MEM_MIB << 20) / PAGE_SIZE as u64;
    // Both memories populated, as a running guest's and a replica's after
    // the initial copy are: the runs measure checkpoints, not first touches.
    let zeros = [0u8; PAGE_SIZE];
    for page in 0..total_pages {
        let gpa = page * PAGE_SIZE as u64;
        primary.write_page(gpa, &zeros).expect("populate");
        replica.write_page(gpa, &zeros).expect("populate");
    }

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
        tx.send_all(&frames).await.expect("send");
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
    let start_cpu = cpu_used(libc::RUSAGE_SELF);
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
        tx.send_all(&frames).await.expect("send");
        in_flight.push_back(epoch);
    }
    while let Some(oldest) = in_flight.pop_front() {
        assert_eq!(next_ack(&mut rx).await, oldest);
    }
    let pipelined_wall = start.elapsed();
    let pipelined_cpu = cpu_used(libc::RUSAGE_SELF).saturating_sub(start_cpu);
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
        pipelined_wall,
        writing,
        pipelined_cpu,
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The CPU time, user and system, `who` (`RUSAGE_SELF`: this process;
/// `RUSAGE_THREAD`: the calling thread) used so far.
fn cpu_used(who: libc::c_int) -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage writes a whole `rusage` into the buffer it is
    // given, which is one; the value is read only when it says it did.
    let usage = unsafe {
        assert_eq!(libc::getrusage(who, usage.as_mut_ptr()), 0);
        usage.assume_init()
    };
    let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    time(usage.ru_utime) + time(usage.ru_stime)
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
