//! `ftprotect`: runs a VM protected at level FT across a node pair.
//!
//! - `ftprotect run ...` boots the VM on this node as the primary; it
//!   protects it whenever a standby answers at `--peer` and runs it
//!   unprotected otherwise.
//! - `ftprotect standby ...` waits on `--listen` for a primary, keeps the
//!   replica, and when the primary is lost promotes the replica and goes
//!   on as the primary (protecting it again once a standby answers at
//!   `--peer`).
//!
//! Split-brain policy (no quorum service yet): the standby promotes when
//! the A-link falls silent for the heartbeat timeout, whatever the cause.
//! A cut A-link with both nodes alive leaves two active copies; give the
//! pair two links (or a quorum service, later) where that matters.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ft_link::Role;
use replicator::interval::IntervalLimits;
use replicator::primary::{self, PrimaryConfig};
use replicator::standby::{self, StandbyConfig};
use replicator::status::StatusBoard;
use replicator::{checkpoint_bench, pairing, promote};
use vmm::config::{BootSource, DiskConfig, FeatureSet, NetConfig, SerialSink, VmConfig, VmEvent};
use vmm::vm::Vm;

#[derive(Parser)]
#[command(
    name = "ftprotect",
    about = "Run a VM protected at level FT across a node pair"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Options both roles share.
#[derive(Args, Clone)]
struct PairOptions {
    /// The protected VM's name (both nodes must give the same).
    #[arg(long)]
    vm_name: String,
    /// This node's name (default: the host name).
    #[arg(long)]
    node: Option<String>,
    /// File holding the pair's shared secret (at least 16 bytes).
    #[arg(long)]
    secret_file: PathBuf,
    /// The peer's addresses (host:port) where a standby listens: the A-link,
    /// optionally a second path (comma-separated) for a redundant pair.
    #[arg(long, value_delimiter = ',', required = true)]
    peer: Vec<String>,
    /// The CPU features the VM is given (both nodes must provide them).
    #[arg(long, value_enum, default_value = "x86-64-v2")]
    cpu_features: FeatureSet,
    /// The standby declares the primary dead after this much silence on
    /// every path (heartbeats go out at a fifth of it).
    #[arg(long, default_value_t = 300)]
    heartbeat_timeout_ms: u64,
    /// Shortest and longest epoch (checkpoint interval).
    #[arg(long, default_value_t = 2)]
    min_interval_ms: u64,
    #[arg(long, default_value_t = 20)]
    max_interval_ms: u64,
    /// Keep the guest paused until each epoch is acknowledged (for
    /// comparison with the default speculative mode).
    #[arg(long)]
    synchronous: bool,
    /// Pre-copy rounds of the initial synchronisation.
    #[arg(long, default_value_t = 4)]
    precopy_rounds: u32,
    /// Put the VM's TAPs on this bridge.
    #[arg(long)]
    bridge: Option<String>,
    /// Write the FT status (JSON) here, a few times a second.
    #[arg(long)]
    status: Option<PathBuf>,
    /// The guest's serial console goes to this file.
    #[arg(long)]
    serial_log: PathBuf,
}

#[derive(Subcommand)]
enum Command {
    /// Boot the VM here as the primary.
    Run {
        #[command(flatten)]
        pair: PairOptions,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "console=ttyS0 reboot=k panic=1 quiet")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
        #[arg(long = "disk", value_name = "PATH[,ro]")]
        disks: Vec<DiskConfig>,
        #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
        nets: Vec<NetConfig>,
    },
    /// Benchmark: boot the VM here and run COUNT checkpoint captures (the
    /// primary's own code, no standby); print the figures as JSON.
    Bench {
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
        #[arg(long, default_value = "console=ttyS0 reboot=k panic=1 quiet")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        #[arg(long, default_value_t = 128)]
        mem_mib: u64,
        /// The guest's serial console goes to this file.
        #[arg(long)]
        serial_log: PathBuf,
        /// Wait for this line on the console before measuring.
        #[arg(long, default_value = "ftguest: init reached")]
        ready_line: String,
        #[arg(long, default_value_t = 300)]
        count: u32,
        /// Guest run time between checkpoints.
        #[arg(long, default_value_t = 10)]
        interval_ms: u64,
    },
    /// Stand by for a primary; take the VM over when it is lost.
    Standby {
        #[command(flatten)]
        pair: PairOptions,
        /// Where to listen for the primary (host:port): the A-link,
        /// optionally a second path (comma-separated).
        #[arg(long, value_delimiter = ',', required = true)]
        listen: Vec<String>,
        /// Replica disk files, one per disk of the VM, in order.
        #[arg(long = "disk", value_name = "PATH")]
        disks: Vec<PathBuf>,
        /// This node's TAPs for the VM's NICs, in order.
        #[arg(long = "tap", value_name = "NAME")]
        taps: Vec<String>,
    },
}

fn node_name(pair: &PairOptions) -> String {
    pair.node.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "node".into())
    })
}

fn primary_config(pair: &PairOptions, link: ft_link::LinkConfig) -> PrimaryConfig {
    PrimaryConfig {
        peers: pair.peer.clone(),
        link,
        interval: IntervalLimits {
            min: Duration::from_millis(pair.min_interval_ms),
            max: Duration::from_millis(pair.max_interval_ms.max(pair.min_interval_ms)),
        },
        synchronous: pair.synchronous,
        precopy_rounds: pair.precopy_rounds,
        retry_every: Duration::from_millis(500),
    }
}

/// Runs `vm` as the primary until the guest stops.
fn run_primary(
    runtime: &tokio::runtime::Runtime,
    vm: Vm,
    pair: &PairOptions,
    node: &str,
    status: &StatusBoard,
) -> ExitCode {
    let link = match link_config(pair, node, Role::Primary) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            return ExitCode::from(2);
        }
    };
    let config = primary_config(pair, link);
    let vm = Arc::new(vm);
    let stop = Arc::new(tokio::sync::Notify::new());
    let protection = runtime.spawn(primary::run(
        Arc::clone(&vm),
        config,
        status.clone(),
        Arc::clone(&stop),
    ));
    let event = vm.wait();
    // Tell a standby in session not to take a stopped VM over.
    stop.notify_one();
    let _ = runtime.block_on(tokio::time::timeout(Duration::from_secs(1), protection));
    status.set_state(
        "primary",
        "stopped",
        Some(format!("guest stopped: {event:?}")),
    );
    match event {
        VmEvent::Reset | VmEvent::Shutdown => {
            eprintln!("ftprotect: guest stopped ({event:?})");
            ExitCode::SUCCESS
        }
        VmEvent::VcpuFailed { index, reason } => {
            eprintln!("ftprotect: vCPU {index} failed: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn link_config(
    pair: &PairOptions,
    node: &str,
    role: Role,
) -> Result<ft_link::LinkConfig, pairing::PairingError> {
    let secret = pairing::read_secret(&pair.secret_file)?;
    let cpu = pairing::cpu_summary(pair.cpu_features)?;
    Ok(pairing::link_config(
        secret,
        node,
        role,
        cpu,
        &pair.vm_name,
        Duration::from_millis(pair.heartbeat_timeout_ms),
    ))
}

/// Boots the VM, waits for `ready_line` on its console (and two seconds
/// more), runs the checkpoint benchmark and prints its report.
fn bench(
    config: VmConfig,
    serial_log: &std::path::Path,
    ready_line: &str,
    count: u32,
    interval_ms: u64,
) -> ExitCode {
    let vm = match Vm::boot(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            return ExitCode::from(2);
        }
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let console = std::fs::read_to_string(serial_log).unwrap_or_default();
        if console.contains(ready_line) {
            break;
        }
        if std::time::Instant::now() > deadline {
            eprintln!("ftprotect: the guest did not print {ready_line:?} within 180 s");
            return ExitCode::FAILURE;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(2));
    match checkpoint_bench::run(&vm, count, Duration::from_millis(interval_ms)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string(&report).expect("a report encodes")
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ftprotect: benchmark failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTPROTECT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ftprotect: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command {
        Command::Run {
            pair,
            kernel,
            initrd,
            cmdline,
            vcpus,
            mem_mib,
            disks,
            nets,
        } => {
            let node = node_name(&pair);
            let status = StatusBoard::new(&node, "primary", pair.status.clone());
            status.spawn_writer(Duration::from_millis(250));
            let config = VmConfig {
                vcpus,
                mem_mib,
                boot: BootSource {
                    kernel,
                    initrd,
                    cmdline,
                },
                serial: SerialSink::File(pair.serial_log.clone()),
                disks,
                nets,
                cpu_features: pair.cpu_features,
            };
            let vm = match Vm::boot(config) {
                Ok(vm) => vm,
                Err(e) => {
                    eprintln!("ftprotect: {e}");
                    return ExitCode::from(2);
                }
            };
            if let Some(bridge) = &pair.bridge {
                for tap in &vm.taps() {
                    promote::join_bridge(tap, bridge);
                }
            }
            run_primary(&runtime, vm, &pair, &node, &status)
        }
        Command::Bench {
            kernel,
            initrd,
            cmdline,
            vcpus,
            mem_mib,
            serial_log,
            ready_line,
            count,
            interval_ms,
        } => {
            let config = VmConfig {
                vcpus,
                mem_mib,
                boot: BootSource {
                    kernel,
                    initrd,
                    cmdline,
                },
                serial: SerialSink::File(serial_log.clone()),
                disks: Vec::new(),
                nets: Vec::new(),
                cpu_features: FeatureSet::X86_64V2,
            };
            bench(config, &serial_log, &ready_line, count, interval_ms)
        }
        Command::Standby {
            pair,
            listen,
            disks,
            taps,
        } => {
            let node = node_name(&pair);
            let status = StatusBoard::new(&node, "standby", pair.status.clone());
            status.spawn_writer(Duration::from_millis(250));
            let link = match link_config(&pair, &node, Role::Standby) {
                Ok(l) => l,
                Err(e) => {
                    eprintln!("ftprotect: {e}");
                    return ExitCode::from(2);
                }
            };
            let config = StandbyConfig {
                listen,
                link,
                disks,
                taps: taps.clone(),
            };
            let replica = match runtime.block_on(standby::stand_by(&config, &status)) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ftprotect: {e}");
                    return ExitCode::from(2);
                }
            };
            status.set_state("standby", "promoting", None);
            let vm = match promote::promote(
                replica,
                &taps,
                pair.bridge.as_deref(),
                SerialSink::File(pair.serial_log.clone()),
            ) {
                Ok(vm) => vm,
                Err(e) => {
                    eprintln!("ftprotect: {e}");
                    status.set_state("standby", "failed", Some(e.to_string()));
                    return ExitCode::FAILURE;
                }
            };
            status.update(|s| s.counters.failovers += 1);
            run_primary(&runtime, vm, &pair, &node, &status)
        }
    }
}
