//! `ftprotect`: runs a VM protected at level FT (or HA, `--level ha`)
//! across a node pair.
//!
//! - `ftprotect run ...` boots the VM on this node as the primary; it
//!   protects it whenever a standby answers at `--peer` and runs it
//!   unprotected otherwise.
//! - `ftprotect standby ...` waits on `--listen` for a primary, keeps the
//!   replica, and when the primary is lost promotes the replica and goes
//!   on as the primary (protecting it again once a standby answers at
//!   `--peer`).
//! - `ftprotect ctl --sock PATH status|stop` asks a running `ftprotect`
//!   on its control socket (`--control-sock`, served in both roles for the
//!   whole life of the process): its FT status as JSON, or to stop (a
//!   primary stops its VM and tells the standby not to take it over; a
//!   standby leaves).
//!
//! Split-brain policy: with `--witness` (an `ftwitness` on a third
//! machine), the standby promotes only with the witness's grant, and a
//! primary that lost its standby goes on only once the witness confirms it
//! (it pauses its guest, output held, while neither answers); a primary the
//! witness says is superseded stops (exit code 3). Without a witness the
//! standby promotes when every path falls silent for the heartbeat
//! timeout, whatever the cause: a cut A-link with both nodes alive leaves
//! two active copies (give the pair two paths, or a witness).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use replicator::control::{self, ControlCommand, ControlRequest, ControlServer};
use replicator::interval::{
    IntervalLimits, DEFAULT_MAX_INTERVAL, DEFAULT_MAX_RUN_AHEAD, DEFAULT_MIN_INTERVAL,
};
use replicator::level::Level;
use replicator::primary::{
    self, PrimaryConfig, PrimaryEnd, DEFAULT_ACK_DEADLINE, DEFAULT_EPOCHS_IN_FLIGHT,
};
use replicator::quorum::WitnessConfig;
use replicator::standby::Machine;
use replicator::standby::{self, StandbyConfig};
use replicator::status::{FtState, Role, StatusBoard};
use replicator::{checkpoint_bench, pairing, promote};
use tokio::sync::Notify;
use vmm::config::{
    BootSource, DirtyTracking, DiskConfig, FeatureSet, NetConfig, SerialSink, VmConfig, VmEvent,
};
use vmm::vm::Vm;
use witness::WitnessClient;

/// How long the protection gets to end once the VM stopped: the epochs in
/// flight drained ([`replicator::primary::DRAIN_AT_STOP`]) and `Stop` sent,
/// with room to spare.
const SESSION_END_WITHIN: Duration = Duration::from_secs(2);

#[derive(Parser)]
#[command(
    name = "ftprotect",
    about = "Run a VM protected at level FT or HA across a node pair"
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
    /// Without one the VM runs unprotected.
    #[arg(long, value_delimiter = ',')]
    peer: Vec<String>,
    /// The CPU features the VM is given (both nodes must provide them).
    #[arg(long, value_enum, default_value = "x86-64-v2")]
    cpu_features: FeatureSet,
    /// The standby declares the primary dead after this much silence on
    /// every path (heartbeats go out at a fifth of it).
    #[arg(long, default_value_t = ft_link::DEFAULT_HEARTBEAT_TIMEOUT.as_millis() as u64)]
    heartbeat_timeout_ms: u64,
    /// Shortest epoch: the guest runs at least this long after each
    /// checkpoint.
    #[arg(long, default_value_t = DEFAULT_MIN_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    min_interval_ms: u64,
    /// Longest epoch: from one checkpoint's start to the next's, the stop
    /// included (20: 50 checkpoints a second when the standby keeps up and
    /// stops are short; after a longer stop the guest runs as long).
    #[arg(long, default_value_t = DEFAULT_MAX_INTERVAL.as_millis() as u64,
          value_parser = clap::value_parser!(u64).range(1..=10_000))]
    max_interval_ms: u64,
    /// The guest is paused once it has run this long past a checkpoint
    /// that is not acknowledged yet, until it is: bounds the next epoch,
    /// and the output it holds, when the A-link is slower than the guest.
    #[arg(long, default_value_t = DEFAULT_MAX_RUN_AHEAD.as_millis() as u64)]
    max_run_ahead_ms: u64,
    /// An epoch (level HA: a batch of disk writes) not acknowledged this
    /// long after it was sent drops the standby (its disk or its host
    /// hangs): the VM goes on unprotected, and is protected again once the
    /// standby answers a new session.
    #[arg(long, default_value_t = DEFAULT_ACK_DEADLINE.as_millis() as u64, value_parser = clap::value_parser!(u64).range(100..))]
    ack_deadline_ms: u64,
    /// Keep the guest paused until each epoch is acknowledged (for
    /// comparison with the default speculative mode).
    #[arg(long)]
    synchronous: bool,
    /// Epochs sent and not yet acknowledged, at most: the next checkpoint
    /// may be taken while this many await the standby (1: each waits for
    /// the last one's acknowledgement).
    #[arg(long, default_value_t = DEFAULT_EPOCHS_IN_FLIGHT, value_parser = clap::value_parser!(usize))]
    epochs_in_flight: usize,
    /// Judge the peer's silence on the connection alone, without pulses
    /// (for comparison).
    #[arg(long)]
    no_pulses: bool,
    /// Run the A-link in plaintext, checked by CRCs only (default: sealed,
    /// authenticated and encrypted). Only for a dedicated cable between
    /// the two nodes; the peer must say the same. Shown in the status.
    #[arg(long)]
    alink_plaintext: bool,
    /// Pre-copy rounds of the initial synchronisation.
    #[arg(long, default_value_t = 4)]
    precopy_rounds: u32,
    /// zstd level of the initial copy's memory and disk frames (0: sent
    /// uncompressed, for an A-link faster than one core compresses: about
    /// 480 MB/s at level 3).
    #[arg(long, default_value_t = replicator::protocol::compressed::DEFAULT_LEVEL,
          value_parser = clap::value_parser!(i32).range(0..=19))]
    copy_compression: i32,
    /// MiB of pages the primary keeps as its standby has them, to send a
    /// page the guest changed in a few places as those changes instead of
    /// whole (0: every page and the VM's state whole).
    #[arg(long, default_value_t = replicator::primary::delta_cache::DEFAULT_DELTA_CACHE_MIB)]
    delta_cache_mib: u64,
    /// Put the VM's TAPs on this bridge.
    #[arg(long)]
    bridge: Option<String>,
    /// Serve the control interface (status, stop; `ftprotect ctl`) on this
    /// Unix socket [default: /run/ftprotect/<vm-name>.sock].
    #[arg(long, value_name = "PATH")]
    control_sock: Option<PathBuf>,
    /// The guest's serial console goes to this file.
    #[arg(long)]
    serial_log: PathBuf,
    /// Keep guest RAM in this file (on a tmpfs, such as /dev/shm) instead
    /// of anonymous memory. It outlives the process: after a switchover or
    /// a superseded copy, this node's next standby finds the VM's memory
    /// there, and the primary resends only the pages that differ. Removed
    /// when the VM stops on purpose (a standby: when its primary says so,
    /// or when it is stopped on the control socket). Reserves the guest's
    /// memory in full when the VM (or its replica) starts.
    #[arg(long, value_name = "PATH")]
    ram_file: Option<PathBuf>,
    /// The quorum witness (`ftwitness`), host:port; comma-separated
    /// addresses are tried in order. Authenticated with the pair secret.
    #[arg(long, value_delimiter = ',')]
    witness: Vec<String>,
    /// `run` only: a primary started unprotected (no standby is started
    /// for it) takes the witness's lease only once a standby first
    /// connects (the VM protected by a later level change). Until then its
    /// output does not wait for the witness and it is not fenced for want
    /// of it; from then on it is held to the lease as any protected copy
    /// (also if it is unprotected again later).
    #[arg(long, requires = "witness")]
    lease_when_protected: bool,
    /// The generation of the active copy this node knows (the primary runs
    /// it; a standby refuses a primary of an older one).
    #[arg(long, default_value_t = 1)]
    generation: u64,
    /// The protection level the primary runs: `ft` (checkpoints: the
    /// standby resumes the VM without a reboot) or `ha` (the disks alone
    /// mirrored synchronously: the standby reboots the VM from its
    /// mirror). A standby follows its primary's plan, and a copy it takes
    /// over runs at the level it was replicated at.
    #[arg(long, default_value = "ft")]
    level: Level,
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
        /// Dirty page tracking: auto takes the dirty bitmap with hot pages
        /// up to 4 GiB of guest memory (where KVM has manual protect) and
        /// the dirty ring above it (where KVM has one); or always the
        /// bitmap or the ring (to compare their stop times).
        #[arg(long, value_enum, default_value = "auto")]
        dirty_tracking: DirtyTracking,
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
    /// Ask a running ftprotect on its control socket.
    Ctl {
        /// Its control socket (`--control-sock`).
        #[arg(long, value_name = "PATH")]
        sock: PathBuf,
        /// Give up when it does not answer within this long.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
        #[arg(value_enum)]
        command: CtlCommand,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CtlCommand {
    /// Print its FT status (JSON).
    Status,
    /// Stop it: a primary stops its VM (no takeover), a standby leaves.
    Stop,
    /// A protected primary: digest the VM at the next checkpoint, for the
    /// standby to compare with its replica (its status shows the verdict).
    Verify,
    /// A protected primary: hand the VM to the standby now (a planned
    /// switchover; the status shows the outcome).
    Switchover,
    /// A primary: go on at level FT (checkpoints) without a reboot.
    LevelFt,
    /// A primary: go on at level HA (the disks mirrored) without a reboot.
    LevelHa,
}

/// `ftprotect ctl`: prints the answer; fails on a refusal or no answer.
fn ctl(sock: &std::path::Path, timeout: Duration, command: CtlCommand) -> ExitCode {
    let command = match command {
        CtlCommand::Status => ControlCommand::Status,
        CtlCommand::Stop => ControlCommand::Stop,
        CtlCommand::Verify => ControlCommand::Verify,
        CtlCommand::Switchover => ControlCommand::Switchover,
        CtlCommand::LevelFt => ControlCommand::LevelFt,
        CtlCommand::LevelHa => ControlCommand::LevelHa,
    };
    let response = match control::request(sock, &ControlRequest::new(command), timeout) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ftprotect ctl: {}", vmm::error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    if !response.ok {
        eprintln!(
            "ftprotect ctl: refused: {}",
            response.error.as_deref().unwrap_or("no reason given")
        );
        return ExitCode::FAILURE;
    }
    let json = match &response.status {
        Some(status) => serde_json::to_string_pretty(status),
        None => serde_json::to_string(&response),
    };
    match json {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ftprotect ctl: cannot print the answer: {e}");
            ExitCode::FAILURE
        }
    }
}

/// An error and its causes, on one line.
/// Serves the control socket for the rest of the process's life; a `stop`
/// asked there is notified on the returned `Notify`.
/// What the control socket hands the engine: `stop`, a forced takeover,
/// and `verify` (digest the next checkpoint).
struct Control {
    stop: Arc<Notify>,
    takeover: Arc<Notify>,
    verify: Arc<std::sync::atomic::AtomicBool>,
    switchover: Arc<replicator::primary::SwitchoverRequest>,
    relevel: Arc<replicator::primary::LevelChange>,
}

fn serve_control(
    runtime: &tokio::runtime::Runtime,
    pair: &PairOptions,
    status: &StatusBoard,
) -> Result<Control, ExitCode> {
    let path = pair
        .control_sock
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/run/ftprotect/{}.sock", pair.vm_name)));
    let server = {
        let _runtime = runtime.enter();
        ControlServer::bind(&path)
    };
    match server {
        Ok(server) => {
            let stop = Arc::new(Notify::new());
            let (takeover, verify) = (server.takeover(), server.verify());
            let switchover = server.switchover();
            let relevel = server.relevel();
            runtime.spawn(server.serve(status.clone(), Arc::clone(&stop)));
            Ok(Control {
                stop,
                takeover,
                verify,
                switchover,
                relevel,
            })
        }
        Err(e) => {
            eprintln!("ftprotect: {}", vmm::error_chain(&e));
            Err(ExitCode::from(2))
        }
    }
}

fn node_name(pair: &PairOptions) -> String {
    pair.node.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "node".into())
    })
}

/// The witness as this node asks it (none without `--witness`).
fn witness_config(pair: &PairOptions, node: &str) -> Result<Option<WitnessConfig>, String> {
    if pair.witness.is_empty() {
        return Ok(None);
    }
    let secret = pairing::read_secret(&pair.secret_file).map_err(|e| e.to_string())?;
    Ok(Some(WitnessConfig {
        client: Arc::new(WitnessClient::new(
            pair.witness.clone(),
            secret,
            node,
            WITNESS_ANSWER_WITHIN,
        )),
        vm: pair.vm_name.clone(),
    }))
}

/// How long a request to the witness may take (a claim is held open up to
/// twice the witness's silence timeout).
const WITNESS_ANSWER_WITHIN: Duration = Duration::from_secs(2);

fn primary_config(
    pair: &PairOptions,
    link: ft_link::LinkConfig,
    generation: u64,
    witness: Option<WitnessConfig>,
    level: Level,
) -> PrimaryConfig {
    PrimaryConfig {
        level,
        relevel: Arc::default(),
        peers: pair.peer.clone(),
        link,
        interval: IntervalLimits {
            min: Duration::from_millis(pair.min_interval_ms),
            max: Duration::from_millis(pair.max_interval_ms.max(pair.min_interval_ms)),
            max_run_ahead: Duration::from_millis(pair.max_run_ahead_ms),
        },
        synchronous: pair.synchronous,
        epochs_in_flight: pair.epochs_in_flight,
        precopy_rounds: pair.precopy_rounds,
        copy_compression: pair.copy_compression,
        delta_cache_bytes: pair.delta_cache_mib.saturating_mul(1 << 20),
        retry_every: Duration::from_millis(500),
        ack_deadline: Duration::from_millis(pair.ack_deadline_ms),
        vm_failed: Arc::default(),
        verify_next: Arc::default(),
        generation,
        witness,
        lease_when_protected: pair.lease_when_protected,
        switchover: Arc::default(),
        first_lease: None,
        ram_file: pair.ram_file.clone(),
        memory_base: None,
    }
}

/// The exit code of a primary the witness says is superseded.
const EXIT_SUPERSEDED: u8 = 3;
/// The exit code of a primary that handed its VM to the standby (a
/// planned switchover).
const EXIT_SWITCHED_OVER: u8 = 4;

/// Why the primary ends.
enum Ended {
    Guest(VmEvent),
    /// `stop` on the control socket.
    Asked,
}

/// Runs `vm` as the primary until the guest stops or a stop is asked on
/// the control socket (`control.stop`).
/// Protects `vm` as the primary. `witness`: the witness as this node
/// already asks it (a promoted standby hands on its connection, so that
/// the first lease, which holds the guest's output, needs no new one);
/// `promoted`: the lease the witness gave with its grant of a takeover,
/// and the checkpoint the memory was restored from.
#[allow(clippy::too_many_arguments)]
fn run_primary(
    runtime: &tokio::runtime::Runtime,
    vm: Vm,
    pair: &PairOptions,
    level: Level,
    node: &str,
    generation: u64,
    witness: Option<WitnessConfig>,
    promoted: Promoted,
    status: &StatusBoard,
    control: &Control,
) -> ExitCode {
    let link = match link_config(pair, node, Role::Primary) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            return ExitCode::from(2);
        }
    };
    let mut config = primary_config(pair, link, generation, witness, level);
    config.first_lease = promoted.first_lease;
    config.memory_base = promoted.memory_base;
    config.verify_next = Arc::clone(&control.verify);
    config.switchover = Arc::clone(&control.switchover);
    config.relevel = Arc::clone(&control.relevel);
    let vm_failed = Arc::clone(&config.vm_failed);
    let vm = Arc::new(vm);
    let stop = Arc::new(tokio::sync::Notify::new());
    let protection = runtime.spawn(primary::run(
        Arc::clone(&vm),
        config,
        status.clone(),
        Arc::clone(&stop),
    ));
    // `Vm::wait` blocks: it gets a thread, whose answer races the control
    // socket's stop.
    let (event_tx, event_rx) = tokio::sync::oneshot::channel();
    let waiting = Arc::clone(&vm);
    std::thread::spawn(move || {
        let _ = event_tx.send(waiting.wait());
    });
    let ended = runtime.block_on(async {
        tokio::select! {
            event = event_rx => Ended::Guest(event.unwrap_or(VmEvent::Shutdown)),
            _ = control.stop.notified() => Ended::Asked,
        }
    });
    if let Ended::Guest(VmEvent::VcpuFailed { .. }) = &ended {
        // A host fault: the standby takes the VM over.
        vm_failed.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    if let Ended::Asked = ended {
        // As when the guest stops: its vCPUs end first.
        vm.stop();
    }
    // Tell a standby in session not to take a stopped VM over.
    stop.notify_one();
    // The timer is made inside the runtime (made outside, it panics: no
    // reactor, and the process ended with 101 instead of its exit code).
    // The session's end: the epochs in flight drained (at most
    // `DRAIN_AT_STOP`), then `Stop` sent to the standby.
    let end =
        runtime.block_on(async { tokio::time::timeout(SESSION_END_WITHIN, protection).await });
    if let Ok(Ok(PrimaryEnd::Superseded { generation, owner })) = end {
        // The status says so already (state "superseded").
        eprintln!(
            "ftprotect: superseded: node {owner} runs the VM at generation {generation}; \
             this copy stopped"
        );
        return ExitCode::from(EXIT_SUPERSEDED);
    }
    if let Ok(Ok(PrimaryEnd::SwitchedOver { epoch })) = end {
        // The status says so already (state "switched-over").
        eprintln!("ftprotect: switched over: the standby took the VM over from checkpoint {epoch}");
        return ExitCode::from(EXIT_SWITCHED_OVER);
    }
    let event = match ended {
        Ended::Guest(event) => event,
        Ended::Asked => {
            forget_ram(pair);
            status.set_state(
                Role::Primary,
                FtState::Stopped,
                Some("stopped on the control socket".into()),
            );
            eprintln!("ftprotect: stopped on the control socket");
            return ExitCode::SUCCESS;
        }
    };
    status.set_state(
        Role::Primary,
        FtState::Stopped,
        Some(format!("guest stopped: {event}")),
    );
    match event {
        VmEvent::Reset(_) | VmEvent::Shutdown => {
            forget_ram(pair);
            eprintln!("ftprotect: guest stopped ({event})");
            ExitCode::SUCCESS
        }
        VmEvent::VcpuFailed { index, reason } => {
            eprintln!("ftprotect: vCPU {index} failed: {reason}");
            ExitCode::FAILURE
        }
    }
}

/// Removes the RAM file of a VM that stopped on purpose (no later standby
/// can use what it held).
fn forget_ram(pair: &PairOptions) {
    if let Some(path) = &pair.ram_file {
        // Its label first: a label never outlives what it describes.
        let _ = std::fs::remove_file(vmm::replication::ram_label::label_path(path));
        if let Err(error) = std::fs::remove_file(path) {
            tracing::warn!(path = %path.display(), %error, "the stopped VM's RAM file could not be removed");
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
    let mut link = pairing::link_config(
        secret,
        node,
        role,
        cpu,
        &pair.vm_name,
        Duration::from_millis(pair.heartbeat_timeout_ms),
    );
    link.pulses = !pair.no_pulses;
    if pair.alink_plaintext {
        link.protection = ft_link::seal::Protection::Plaintext;
    }
    Ok(link)
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
        // Colours on a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTPROTECT_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .init();
    if !replicator::heap::keep_freed_memory() {
        tracing::warn!("the allocator did not take its settings: epoch buffers fault in afresh");
    }
    let cli = Cli::parse();
    match cli.command {
        Command::Ctl {
            sock,
            timeout_ms,
            command,
        } => ctl(&sock, Duration::from_millis(timeout_ms), command),
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
            let config = VmConfig {
                vcpus,
                mem_mib,
                boot: BootSource {
                    kernel,
                    initrd,
                    cmdline,
                },
                serial: SerialSink::File(pair.serial_log.clone()),
                // Every writable disk keeps a written map beside it, from
                // the first write on: a resynchronisation compares only
                // the extents it names (`replicator::written`).
                disks: disks
                    .into_iter()
                    .map(|d| DiskConfig {
                        written_map: !d.read_only,
                        ..d
                    })
                    .collect(),
                nets,
                cpu_features: pair.cpu_features,
                dirty_tracking: DirtyTracking::Auto,
                ram_file: pair.ram_file.clone(),
            };
            with_runtime(|runtime| run(runtime, &pair, config))
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
            dirty_tracking,
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
                dirty_tracking,
                ram_file: None,
            };
            bench(config, &serial_log, &ready_line, count, interval_ms)
        }
        Command::Standby {
            pair,
            listen,
            disks,
            taps,
        } => {
            if pair.lease_when_protected {
                // A copy it promotes must hold its lease from the start.
                eprintln!("ftprotect: --lease-when-protected is for `run` (a primary started unprotected), not for a standby");
                return ExitCode::from(2);
            }
            with_runtime(|runtime| standby(runtime, &pair, listen, disks, taps))
        }
    }
}

/// The async runtime's workers: two, or one where the process may use
/// one CPU only (a small node, a lab node): there a second worker only
/// adds the wake-ups of two threads taking work from each other (a futex
/// and an epoll round per hand-over) to the CPU the guest's vCPUs need.
/// The long work of a task runs off the workers either way
/// ([`replicator`]'s `off_the_workers`), and the pulses that keep the
/// peer's liveness have a thread of their own.
fn runtime_workers() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get().min(2))
}

/// Runs `f` with the async runtime of the FT roles.
fn with_runtime(f: impl FnOnce(&tokio::runtime::Runtime) -> ExitCode) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(runtime_workers())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ftprotect: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let code = f(&runtime);
    // Tasks still running (the control socket, a session's tasks) end here.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

/// `ftprotect run`: boots the VM here and runs it as the primary.
fn run(runtime: &tokio::runtime::Runtime, pair: &PairOptions, config: VmConfig) -> ExitCode {
    let node = node_name(pair);
    let status = StatusBoard::new(&node, Role::Primary);
    status.update(|s| s.heartbeat_timeout_ms = pair.heartbeat_timeout_ms);
    let control = match serve_control(runtime, pair, &status) {
        Ok(control) => control,
        Err(code) => return code,
    };
    let taps: Vec<String> = config.nets.iter().map(|n| n.tap.clone()).collect();
    let vm = match Vm::boot(config) {
        Ok(vm) => vm,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            status.set_state(Role::Primary, FtState::Failed, Some(e.to_string()));
            return ExitCode::from(2);
        }
    };
    if let Some(bridge) = &pair.bridge {
        for tap in &taps {
            promote::join_bridge(tap, bridge);
        }
    }
    let witness = match witness_config(pair, &node) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            return ExitCode::from(2);
        }
    };
    run_primary(
        runtime,
        vm,
        pair,
        pair.level,
        &node,
        pair.generation,
        witness,
        Promoted::default(),
        &status,
        &control,
    )
}

/// What a promoted copy starts from (nothing for one started as the
/// primary).
#[derive(Default)]
struct Promoted {
    /// The lease the witness gave with its grant of the takeover.
    first_lease: Option<replicator::quorum::GrantedLease>,
    /// The checkpoint its memory was restored from (level FT).
    memory_base: Option<(replicator::memory_point::Lineage, u64)>,
}

/// `ftprotect standby`: keeps the replica; promotes it when the primary is
/// lost and goes on as the primary.
fn standby(
    runtime: &tokio::runtime::Runtime,
    pair: &PairOptions,
    listen: Vec<String>,
    disks: Vec<PathBuf>,
    taps: Vec<String>,
) -> ExitCode {
    let node = node_name(pair);
    let status = StatusBoard::new(&node, Role::Standby);
    status.update(|s| s.heartbeat_timeout_ms = pair.heartbeat_timeout_ms);
    let control = match serve_control(runtime, pair, &status) {
        Ok(control) => control,
        Err(code) => return code,
    };
    let link = match link_config(pair, &node, Role::Standby) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            return ExitCode::from(2);
        }
    };
    let witness = match witness_config(pair, &node) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("ftprotect: {e}");
            return ExitCode::from(2);
        }
    };
    // Connected while standing by: a claim at a takeover then waits for
    // the witness's decision only, not for a connection and handshake.
    if let Some(w) = &witness {
        let client = Arc::clone(&w.client);
        runtime.spawn(async move {
            if let Err(error) = client.connect().await {
                tracing::warn!(%error, "the witness is not reachable now; the standby connects again when it needs it");
            }
        });
    }
    // The TAPs are made ready while standing by (level FT promotes onto
    // them; level HA's boot attaches its own: these are closed first).
    let attached_taps = match &pair.bridge {
        Some(bridge) => promote::prepare_taps(&taps, bridge),
        None => vmm::replication::AttachedTaps::default(),
    };
    let config = StandbyConfig {
        listen,
        link,
        disks,
        ram_file: pair.ram_file.clone(),
        taps: taps.clone(),
        min_generation: pair.generation,
        witness: witness.clone(),
        force_takeover: Arc::clone(&control.takeover),
    };
    let standing_by = runtime.block_on(async {
        tokio::select! {
            replica = standby::stand_by(&config, &status) => Some(replica),
            _ = control.stop.notified() => None,
        }
    });
    let replica = match standing_by {
        Some(Ok(r)) => r,
        Some(Err(e)) => {
            eprintln!("ftprotect: {e}");
            status.set_state(Role::Standby, FtState::Failed, Some(e.to_string()));
            return ExitCode::from(2);
        }
        None => {
            standby::forget_ram(&config);
            status.set_state(
                Role::Standby,
                FtState::Stopped,
                Some("stopped on the control socket".into()),
            );
            eprintln!("ftprotect: stopped on the control socket");
            return ExitCode::SUCCESS;
        }
    };
    status.set_state(Role::Standby, FtState::Promoting, None);
    let generation = replica.generation;
    let switchover = replica.switchover;
    let first_lease = replica.granted_lease;
    let memory_base = replica.memory_point;
    let promoting = std::time::Instant::now();
    let (ended, epoch) = (replica.ended, replica.epoch);
    let decided = replica.decided.unwrap_or(promoting);
    // Level FT resumes the replica's checkpoint; level HA boots the VM
    // from its mirrored disks.
    let (taken_over, level) = match replica.machine {
        Machine::Checkpoint(_) => (
            promote::promote(
                replica,
                &taps,
                attached_taps,
                pair.bridge.as_deref(),
                SerialSink::File(pair.serial_log.clone()),
            )
            .map(|promoted| {
                status.update(|s| {
                    s.counters.inbound_replayed += promoted.replayed_frames;
                    s.counters.inbound_overheard += promoted.overheard_frames;
                });
                (promoted.vm, promoted.restore)
            }),
            Level::Ft,
        ),
        Machine::Boot(_) => {
            // The boot attaches its TAPs itself.
            drop(attached_taps);
            (
                promote::boot_from_mirror(
                    replica,
                    &taps,
                    pair.bridge.as_deref(),
                    promote::BootHere {
                        serial: SerialSink::File(pair.serial_log.clone()),
                        cpu_features: pair.cpu_features,
                        ram_file: pair.ram_file.clone(),
                    },
                )
                .map(|vm| (vm, promoting.elapsed())),
                Level::Ha,
            )
        }
    };
    let vm = match taken_over {
        Ok((vm, restore)) => {
            let running = std::time::Instant::now();
            let times = promote::takeover_times(
                ended,
                decided,
                promoting,
                restore,
                running,
                (epoch, switchover),
            );
            tracing::info!(
                epoch,
                switchover,
                detect_ms = ?times.detect_ms,
                claim_ms = times.claim_ms,
                promote_ms = times.promote_ms,
                restore_ms = times.restore_ms,
                total_ms = ?times.total_ms,
                "takeover done: the guest runs on this node"
            );
            status.update(|s| s.last_takeover = Some(times));
            vm
        }
        Err(e) => {
            eprintln!("ftprotect: {e}");
            status.set_state(Role::Standby, FtState::Failed, Some(e.to_string()));
            return ExitCode::FAILURE;
        }
    };
    status.update(|s| {
        if switchover {
            s.counters.switchovers += 1;
        } else {
            s.counters.failovers += 1;
        }
    });
    run_primary(
        runtime,
        vm,
        pair,
        level,
        &node,
        generation,
        witness,
        Promoted {
            first_lease,
            memory_base,
        },
        &status,
        &control,
    )
}
