//! `ft-counter`: prints a counter that increases every `--interval-ms`
//! (default 100) to stdout. A restored guest must continue the count where
//! the capture left it, never start over.

use std::time::Duration;

fn main() {
    let interval = std::env::args()
        .skip_while(|a| a != "--interval-ms")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let mut count: u64 = 0;
    loop {
        count += 1;
        println!("ft-counter {count}");
        std::thread::sleep(Duration::from_millis(interval));
    }
}
