//! API latency under load: the real `ftd` on loopback with 20 VMs defined,
//! 50 concurrent clients (each its own connection pool) asking `GET
//! /api/vms` and `GET /api/vms/{name}` in turn; prints p50/p99/max per
//! endpoint and the request rate. The machine's own floor is measured in
//! the same run: one client alone, one request at a time.
//!
//! `cargo bench -p ftd --bench api_latency` (CLIENTS, REQUESTS per client
//! from the environment: FTD_BENCH_CLIENTS, FTD_BENCH_REQUESTS).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::Daemon;
use serde_json::json;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    if v.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs `clients` threads of `requests` each; returns (list, show)
/// latencies and the wall time.
fn run(d: &Daemon, clients: usize, requests: usize) -> (Vec<Duration>, Vec<Duration>, Duration) {
    let start = Instant::now();
    let handles: Vec<_> = (0..clients)
        .map(|c| {
            let url = d.url.clone();
            let token = d.token.clone();
            std::thread::spawn(move || {
                let agent: ureq::Agent = ureq::Agent::config_builder()
                    .timeout_global(Some(Duration::from_secs(30)))
                    .build()
                    .into();
                let (mut list, mut show) = (Vec::new(), Vec::new());
                for i in 0..requests {
                    let path = if i % 2 == 0 {
                        "/api/vms".to_string()
                    } else {
                        format!("/api/vms/vm-{:02}", (c + i) % 20)
                    };
                    let t = Instant::now();
                    let mut r = agent
                        .get(format!("{url}{path}"))
                        .header("Authorization", format!("Bearer {token}"))
                        .call()
                        .expect("request");
                    let _ = r.body_mut().read_to_string().expect("body");
                    let took = t.elapsed();
                    if i % 2 == 0 {
                        list.push(took);
                    } else {
                        show.push(took);
                    }
                }
                (list, show)
            })
        })
        .collect();
    let (mut list, mut show) = (Vec::new(), Vec::new());
    for h in handles {
        let (l, s) = h.join().expect("client thread");
        list.extend(l);
        show.extend(s);
    }
    (list, show, start.elapsed())
}

fn report(what: &str, list: &mut [Duration], show: &mut [Duration], wall: Duration) {
    let n = list.len() + show.len();
    println!(
        "{what:<24} list p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms | show p50 {:>7.2} ms  p99 {:>7.2} ms  max {:>7.2} ms | {:>7.0} req/s",
        ms(percentile(list, 50.0)),
        ms(percentile(list, 99.0)),
        ms(list.iter().copied().max().unwrap_or_default()),
        ms(percentile(show, 50.0)),
        ms(percentile(show, 99.0)),
        ms(show.iter().copied().max().unwrap_or_default()),
        n as f64 / wall.as_secs_f64()
    );
}

fn main() {
    let clients: usize = std::env::var("FTD_BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let requests: usize = std::env::var("FTD_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let d = Daemon::init();
    let kernel = d.state_dir().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    for i in 0..20 {
        let (status, body) = d.call(
            "POST",
            "/api/vms",
            "/api/vms",
            Some(json!({
                "name": format!("vm-{i:02}"),
                "kernel": kernel.to_string_lossy(),
                "disks": [{"size_mib": 64}],
                "nics": [{}],
                "level": "unprotected"
            })),
        );
        assert_eq!(status, 201, "{body}");
    }
    println!(
        "ftd API latency on loopback, 20 VMs defined ({} cores)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let (mut l1, mut s1, w1) = run(&d, 1, requests);
    report("1 client (the floor)", &mut l1, &mut s1, w1);
    let (mut l, mut s, w) = run(&d, clients, requests);
    report(&format!("{clients} concurrent clients"), &mut l, &mut s, w);
}
