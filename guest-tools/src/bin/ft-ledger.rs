//! `ft-ledger PORT FILE`: the ledger service (see `guest_tools::ledger`).
//! Every APPEND is written to FILE and fsync'd before it is acknowledged;
//! FILE requests read the file back from the disk (its cached pages are
//! dropped first). For benchmarks it also runs workloads on request, timed
//! inside the guest: `PING` (round trips), `SPIN ms` (CPU-bound loop turns)
//! and `DIRTY ms mib` (memory-bound: pages written round-robin).

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guest_tools::dirtier::Dirtier;

struct Ledger {
    ids: Vec<u64>,
    file: File,
}

fn ids_line(tag: &str, ids: &[u64]) -> String {
    let mut s = format!("{tag} {}", ids.len());
    for id in ids {
        s.push(' ');
        s.push_str(&id.to_string());
    }
    s
}

fn read_back(ledger: &mut Ledger) -> std::io::Result<Vec<u64>> {
    ledger.file.sync_all()?;
    // SAFETY: posix_fadvise on an open descriptor this process owns; it
    // only drops clean cached pages, so the next read comes from the disk.
    unsafe { libc::posix_fadvise(ledger.file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut text = String::new();
    ledger.file.seek(SeekFrom::Start(0))?;
    ledger.file.read_to_string(&mut text)?;
    ledger.file.seek(SeekFrom::End(0))?;
    Ok(text.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

/// CPU-bound work for `ms` milliseconds; returns loop turns.
fn spin(ms: u64) -> u64 {
    let end = Instant::now() + Duration::from_millis(ms);
    let (mut turns, mut x) = (0u64, 1u64);
    while Instant::now() < end {
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
        }
        turns += 10_000;
    }
    std::hint::black_box(x);
    turns
}

/// Memory-bound work: writes pages of a `mib` MiB buffer round-robin for
/// `ms` milliseconds; returns pages written.
fn dirty(ms: u64, mib: usize) -> u64 {
    let mut d = Dirtier::new(mib);
    let end = Instant::now() + Duration::from_millis(ms);
    let mut pages = 0u64;
    while Instant::now() < end {
        d.dirty(256);
        pages += 256;
    }
    std::hint::black_box(d.checksum());
    pages
}

/// The folder of the ledger file, where the disk workloads write.
static DISK_DIR: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// `n` writes of 4 KiB, each `pwrite` + `fdatasync`, round-robin over the
/// first MiB of a file of their own: "DISKLAT p50_us p99_us n".
fn disk_latency(n: usize) -> std::io::Result<String> {
    use std::os::unix::fs::FileExt;
    let path = DISK_DIR
        .get()
        .map_or("/tmp".into(), Clone::clone)
        .join("bench-latency");
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&path)?;
    let mut block = [0u8; 4096];
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        block[..8].copy_from_slice(&(i as u64 + 1).to_le_bytes());
        let start = Instant::now();
        file.write_all_at(&block, (i as u64 % 256) * 4096)?;
        file.sync_data()?;
        took.push(start.elapsed().as_micros() as u64);
    }
    took.sort_unstable();
    let at = |p: usize| took.get((took.len() * p / 100).min(took.len().saturating_sub(1)));
    Ok(format!(
        "DISKLAT {} {} {n}",
        at(50).copied().unwrap_or(0),
        at(99).copied().unwrap_or(0)
    ))
}

/// `mib` MiB written sequentially in 1 MiB writes, then `fdatasync`, into
/// a new file, removed after unless `keep` (then it is data for a copy
/// to move): "DISKSEQ bytes micros".
fn disk_throughput(mib: usize, keep: bool) -> std::io::Result<String> {
    let name = if keep {
        "bench-kept"
    } else {
        "bench-sequential"
    };
    let path = DISK_DIR
        .get()
        .map_or("/tmp".into(), Clone::clone)
        .join(name);
    let mut file = File::create(&path)?;
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8 + 1).collect();
    let start = Instant::now();
    let written = (|| {
        for _ in 0..mib {
            file.write_all(&chunk)?;
        }
        file.sync_data()
    })();
    let micros = start.elapsed().as_micros();
    drop(file);
    if !keep || written.is_err() {
        let _ = std::fs::remove_file(&path);
    }
    written?;
    Ok(format!("DISKSEQ {} {micros}", mib << 20))
}

fn workload(request: &str) -> Option<String> {
    let w: Vec<&str> = request.split_ascii_whitespace().collect();
    let io = |r: std::io::Result<String>| r.unwrap_or_else(|e| format!("ERR disk workload: {e}"));
    match w.as_slice() {
        ["PING"] => Some("PONG".into()),
        ["DISKLAT", n] => Some(io(disk_latency(n.parse::<usize>().ok()?.clamp(1, 100_000)))),
        ["DISKSEQ", mib] => Some(io(disk_throughput(
            mib.parse::<usize>().ok()?.clamp(1, 1024),
            false,
        ))),
        ["DISKSEQ", mib, "keep"] => Some(io(disk_throughput(
            mib.parse::<usize>().ok()?.clamp(1, 1024),
            true,
        ))),
        ["SPIN", ms] => Some(format!("SPUN {}", spin(ms.parse().ok()?))),
        ["DIRTY", ms, mib] => Some(format!(
            "DIRTIED {}",
            dirty(ms.parse().ok()?, mib.parse::<usize>().ok()?.clamp(1, 1024))
        )),
        _ => None,
    }
}

fn answer(ledger: &Mutex<Ledger>, request: &str) -> String {
    if let Some(reply) = workload(request) {
        return reply;
    }
    let mut ledger = ledger.lock().expect("ledger lock");
    let mut words = request.split_ascii_whitespace();
    match (words.next(), words.next()) {
        (Some("APPEND"), Some(id)) => {
            let Ok(id) = id.parse::<u64>() else {
                return format!("ERR bad id {id:?}");
            };
            let written = ledger
                .file
                .write_all(format!("{id}\n").as_bytes())
                .and_then(|_| ledger.file.sync_data());
            match written {
                Ok(()) => {
                    ledger.ids.push(id);
                    format!("OK {id} {}", ledger.ids.len())
                }
                Err(e) => format!("ERR write failed: {e}"),
            }
        }
        (Some("DUMP"), None) => ids_line("MEM", &ledger.ids),
        (Some("FILE"), None) => match read_back(&mut ledger) {
            Ok(ids) => ids_line("FILE", &ids),
            Err(e) => format!("ERR read failed: {e}"),
        },
        _ => format!("ERR unknown request {request:?}"),
    }
}

/// Serves one client. Each connection's start and end go to the console
/// (with the reason when it ends in an error): a test that sees a
/// connection fail can tell whether the guest ever had it.
fn serve(conn: TcpStream, ledger: Arc<Mutex<Ledger>>) {
    let peer = conn
        .peer_addr()
        .map_or_else(|_| "?".to_string(), |a| a.to_string());
    eprintln!("ft-ledger: connection from {peer}");
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut requests = 0u64;
    let end = (|| {
        for line in BufReader::new(conn).lines() {
            let line = line.map_err(|e| format!("read failed: {e}"))?;
            let reply = answer(&ledger, line.trim());
            out.write_all(format!("{reply}\n").as_bytes())
                .map_err(|e| format!("write failed: {e}"))?;
            requests += 1;
        }
        Ok::<(), String>(())
    })();
    match end {
        Ok(()) => eprintln!("ft-ledger: {peer} closed after {requests} requests"),
        Err(e) => eprintln!("ft-ledger: {peer} ended after {requests} requests: {e}"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(port), Some(path)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: ft-ledger PORT FILE");
        std::process::exit(2);
    };
    let file = match OpenOptions::new()
        .create(true)
        .read(true)
        .append(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ft-ledger: cannot open {path}: {e}");
            std::process::exit(2);
        }
    };
    let dir = std::path::Path::new(path)
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .map_or_else(
            || std::path::PathBuf::from("."),
            std::path::Path::to_path_buf,
        );
    let _ = DISK_DIR.set(dir);
    let mut ledger = Ledger {
        ids: Vec::new(),
        file,
    };
    match read_back(&mut ledger) {
        Ok(ids) => ledger.ids = ids,
        Err(e) => {
            eprintln!("ft-ledger: cannot read {path}: {e}");
            std::process::exit(2);
        }
    }
    let listener = match TcpListener::bind(("0.0.0.0", port.parse().unwrap_or(7000))) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ft-ledger: cannot listen on port {port}: {e}");
            std::process::exit(2);
        }
    };
    println!(
        "ft-ledger: serving {path} on port {port} ({} entries)",
        ledger.ids.len()
    );
    let ledger = Arc::new(Mutex::new(ledger));
    for conn in listener.incoming().flatten() {
        let ledger = Arc::clone(&ledger);
        std::thread::spawn(move || serve(conn, ledger));
    }
}
