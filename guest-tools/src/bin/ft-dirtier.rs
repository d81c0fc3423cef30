//! `ft-dirtier --mib 64 --pages-per-sec 10000 --seconds 10`

use std::time::{Duration, Instant};

use clap::Parser;
use guest_tools::dirtier::Dirtier;

#[derive(Parser)]
#[command(about = "Dirty guest memory at a chosen rate (for checkpoint benchmarks)")]
struct Args {
    /// Size of the buffer to dirty, in MiB.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Pages written per second.
    #[arg(long, default_value_t = 10_000)]
    pages_per_sec: u64,
    /// How long to run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

fn main() {
    let args = Args::parse();
    let mut dirtier = Dirtier::new(args.mib);
    let start = Instant::now();
    let written = dirtier.run(args.pages_per_sec, Duration::from_secs_f64(args.seconds));
    let secs = start.elapsed().as_secs_f64();
    println!(
        "{{\"pages_written\":{written},\"seconds\":{secs:.3},\"pages_per_sec\":{:.0},\"buffer_pages\":{}}}",
        written as f64 / secs,
        dirtier.pages()
    );
}
