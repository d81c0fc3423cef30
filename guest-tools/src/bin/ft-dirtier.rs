//! `ft-dirtier rate --mib 64 --pages-per-sec 10000 --seconds 10`: dirty memory
//! at a chosen rate (for checkpoint benchmarks).
//!
//! `ft-dirtier known-pages --pages 256 --delay-secs 5`: fault in a buffer,
//! print the guest frame numbers of its pages (`ft-dirtier frames a,b,...`),
//! wait, write every page once (`ft-dirtier wrote`), then idle, so the host
//! can check that its dirty harvest holds exactly those frames.

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use guest_tools::dirtier::{Dirtier, PAGE_SIZE};
use guest_tools::pagemap;

#[derive(Parser)]
#[command(about = "Dirty guest memory (checkpoint benchmarks and dirty-tracking tests)")]
struct Args {
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand)]
enum Mode {
    Rate {
        /// Size of the buffer to dirty, in MiB.
        #[arg(long, default_value_t = 64)]
        mib: usize,
        /// Pages written per second.
        #[arg(long, default_value_t = 10_000)]
        pages_per_sec: u64,
        /// How long to run.
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        /// Also write this file (4 KiB blocks at varying offsets,
        /// fdatasync every 16 writes) while dirtying memory.
        #[arg(long)]
        disk_file: Option<std::path::PathBuf>,
        /// Size of `--disk-file` in MiB: its blocks are rewritten over and
        /// over, so it must fit the guest's disk (the lab's is 16 MiB).
        #[arg(long, default_value_t = 4)]
        disk_file_mib: u64,
        /// Blocks written to `--disk-file` per second.
        #[arg(long, default_value_t = 200)]
        disk_blocks_per_sec: u64,
    },
    KnownPages {
        #[arg(long, default_value_t = 256)]
        pages: usize,
        #[arg(long, default_value_t = 5)]
        delay_secs: u64,
    },
}

fn main() {
    match Args::parse().mode {
        Mode::Rate {
            mib,
            pages_per_sec,
            seconds,
            disk_file,
            disk_file_mib,
            disk_blocks_per_sec,
        } => {
            if let Some(path) = disk_file {
                let duration = Duration::from_secs_f64(seconds);
                std::thread::spawn(move || {
                    write_disk(&path, disk_file_mib, disk_blocks_per_sec, duration)
                });
            }
            let mut dirtier = Dirtier::new(mib);
            let start = Instant::now();
            let written = dirtier.run(pages_per_sec, Duration::from_secs_f64(seconds));
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{{\"pages_written\":{written},\"seconds\":{secs:.3},\"pages_per_sec\":{:.0},\"buffer_pages\":{}}}",
                written as f64 / secs,
                dirtier.pages()
            );
        }
        Mode::KnownPages { pages, delay_secs } => {
            // Page-aligned so that each page of the buffer is one frame.
            let mut buf = vec![0u8; (pages + 1) * PAGE_SIZE];
            let offset = buf.as_ptr().align_offset(PAGE_SIZE);
            for p in 0..pages {
                buf[offset + p * PAGE_SIZE] = 1;
            }
            let map = pagemap::open().expect("open pagemap");
            let frames: Vec<String> = (0..pages)
                .map(|p| {
                    let addr = buf.as_ptr() as usize + offset + p * PAGE_SIZE;
                    pagemap::frame_of(&map, addr)
                        .expect("frame number")
                        .to_string()
                })
                .collect();
            println!("ft-dirtier frames {}", frames.join(","));
            std::thread::sleep(Duration::from_secs(delay_secs));
            for p in 0..pages {
                buf[offset + p * PAGE_SIZE] = 2;
            }
            println!("ft-dirtier wrote {pages}");
            loop {
                std::thread::sleep(Duration::from_secs(3600));
                std::hint::black_box(&buf);
            }
        }
    }
}

/// Writes 4 KiB blocks of a `mib` MiB file at `per_sec`, each block holding
/// its write's sequence number, with an fdatasync every 16 writes. A file
/// that does not fit the disk ends the writer with ENOSPC, loudly.
fn write_disk(path: &std::path::Path, mib: u64, per_sec: u64, duration: Duration) {
    use std::os::unix::fs::FileExt;
    const BLOCK: u64 = 4096;
    let blocks = (mib.max(1) << 20) / BLOCK;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .expect("open the disk file");
    let start = Instant::now();
    let mut block = vec![0u8; BLOCK as usize];
    let mut n: u64 = 0;
    while start.elapsed() < duration {
        let at = (n.wrapping_mul(2_654_435_761) % blocks) * BLOCK;
        block.fill((n % 251) as u8);
        block[..8].copy_from_slice(&n.to_le_bytes());
        file.write_all_at(&block, at).expect("write the disk file");
        n += 1;
        if n.is_multiple_of(16) {
            file.sync_data().expect("fdatasync the disk file");
        }
        let due = start + Duration::from_secs_f64(n as f64 / per_sec.max(1) as f64);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
}
