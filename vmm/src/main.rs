//! `ftvmm`: the VMM binary.

use std::process::ExitCode;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use vmm::config::{
    BootSource, DirtyTracking, DiskConfig, FeatureSet, NetConfig, SerialSink, VmConfig, VmEvent,
};
use vmm::control::{self, BoundSocket, CaptureDir, ControlRequest};
use vmm::vm::Vm;

#[derive(Parser)]
#[command(name = "ftvmm", about = "rust-vmm based VMM of the FT pair")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Linux guest and run it until it resets or powers off.
    Run {
        /// Kernel: a PVH vmlinux (ELF) or a bzImage.
        #[arg(long)]
        kernel: PathBuf,
        /// Initramfs (cpio, optionally compressed).
        #[arg(long)]
        initrd: Option<PathBuf>,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0 reboot=k panic=1")]
        cmdline: String,
        #[arg(long, default_value_t = 1)]
        vcpus: u8,
        /// Guest RAM in MiB.
        #[arg(long, default_value_t = 256)]
        mem_mib: u64,
        /// Serial console to this file (default: stdout).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        #[command(flatten)]
        control: ControlOptions,
        /// A virtio-blk disk backed by a raw image: PATH or PATH,ro
        /// (repeatable; the guest sees vda, vdb, ... in this order).
        #[arg(long = "disk", value_name = "PATH[,ro]")]
        disks: Vec<DiskConfig>,
        /// A virtio-net NIC backed by a TAP: tap=NAME,mac=52:54:00:12:34:56
        /// (repeatable).
        #[arg(long = "net", value_name = "tap=NAME,mac=MAC")]
        nets: Vec<NetConfig>,
        /// The CPU features the guest may use (recorded with its state; a
        /// host lacking one refuses to restore it).
        #[arg(long, value_enum, default_value = "x86-64-v2")]
        cpu_features: FeatureSet,
        /// How dirty pages are tracked: auto takes the dirty bitmap with
        /// hot pages up to 4 GiB of guest memory (where KVM has manual
        /// protect) and the dirty ring above it (where KVM has one); or
        /// always the bitmap or the ring (to compare).
        #[arg(long, value_enum, default_value = "auto")]
        dirty_tracking: DirtyTracking,
    },
    /// Continue a VM captured with `ftvmm ctl capture` in this process.
    Restore {
        /// The capture directory (state.json, memory.bin).
        dir: PathBuf,
        /// Serial console to this file (default: stdout).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        #[command(flatten)]
        control: ControlOptions,
    },
    /// Send a request to a running ftvmm's control socket; prints the JSON answer.
    Ctl {
        #[arg(long)]
        sock: PathBuf,
        #[command(subcommand)]
        request: CtlCommand,
    },
    /// Say which KVM serves /dev/kvm and whether it can boot stock guests.
    Host,
    /// Run a tiny ring-0 guest and check its exits and result; prints JSON.
    Selftest {
        /// Loop turns of the guest (its run time scales with this).
        #[arg(long, default_value_t = 2_000_000)]
        iterations: u32,
    },
}

/// The control socket of `run` and `restore`.
#[derive(clap::Args)]
struct ControlOptions {
    /// Serve the control socket here (pause, resume, capture, harvest,
    /// counters), mode 0600. A stale socket there is replaced; anything
    /// else there is an error.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// The folder that `capture NAME` and `harvest --pages-file NAME` write
    /// into (created, mode 0700, if missing) [default: <api-sock>.captures].
    #[arg(long, requires = "api_sock")]
    capture_dir: Option<PathBuf>,
}

/// A control socket bound and its capture folder, before the VM exists.
struct Control {
    socket: BoundSocket,
    captures: CaptureDir,
}

impl ControlOptions {
    /// Binds the socket and opens the capture folder (before the VM
    /// starts: a refusal must not leave a second VM running on the same
    /// disks as the one that serves the socket already).
    fn prepare(self) -> Result<Option<Control>, ExitCode> {
        let Some(path) = self.api_sock else {
            return Ok(None);
        };
        let captures = self
            .capture_dir
            .unwrap_or_else(|| CaptureDir::default_for(&path));
        let captures = CaptureDir::open(&captures).map_err(|e| fail(&e))?;
        let socket = control::socket::bind(&path).map_err(|e| fail(&e))?;
        Ok(Some(Control { socket, captures }))
    }
}

/// Prints `e` with its causes; the exit code of a refusal to start.
fn fail(e: &dyn std::error::Error) -> ExitCode {
    eprintln!("ftvmm: {}", vmm::error_chain(e));
    ExitCode::from(2)
}

#[derive(Subcommand)]
enum CtlCommand {
    Status,
    Pause,
    Resume,
    /// Pause, capture state and memory into the capture folder's entry
    /// NAME (a simple name, not a path), resume.
    Capture {
        name: String,
    },
    /// Pause, harvest the dirty pages, resume; optionally list them in the
    /// capture folder's entry NAME.
    Harvest {
        #[arg(long, value_name = "NAME")]
        pages_file: Option<String>,
    },
    Counters,
}

/// Runs `vm` (serving its control socket) until the guest stops.
fn run_until_stopped(vm: Vm, control: Option<Control>) -> ExitCode {
    let vm = Arc::new(vm);
    let server = match control {
        Some(Control { socket, captures }) => {
            match control::serve(socket, captures, Arc::clone(&vm)) {
                Ok(server) => Some(server),
                Err(e) => {
                    vm.stop();
                    return fail(&e);
                }
            }
        }
        None => None,
    };
    let event = vm.wait();
    let secs = vm.uptime().as_secs_f64();
    // Stops serving and removes the socket (if it is still ours).
    drop(server);
    match event {
        VmEvent::Reset(_) | VmEvent::Shutdown => {
            eprintln!("ftvmm: guest stopped ({event}) after {secs:.3}s");
            ExitCode::SUCCESS
        }
        VmEvent::VcpuFailed { index, reason } => {
            eprintln!("ftvmm: vCPU {index} failed after {secs:.3}s: {reason}");
            ExitCode::FAILURE
        }
    }
}

fn main() -> ExitCode {
    // Structured logs to stderr; FTVMM_LOG=debug for more.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        // Colours on a terminal only: a log file gets plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FTVMM_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            kernel,
            initrd,
            cmdline,
            vcpus,
            mem_mib,
            serial_log,
            control,
            disks,
            nets,
            cpu_features,
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
                serial: serial_log.map_or(SerialSink::Stdout, SerialSink::File),
                disks,
                nets,
                cpu_features,
                dirty_tracking,
                ram_file: None,
            };
            let control = match control.prepare() {
                Ok(c) => c,
                Err(code) => return code,
            };
            match Vm::boot(config) {
                Ok(vm) => run_until_stopped(vm, control),
                Err(e) => {
                    eprintln!("ftvmm: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Restore {
            dir,
            serial_log,
            control,
        } => {
            let control = match control.prepare() {
                Ok(c) => c,
                Err(code) => return code,
            };
            let serial = serial_log.map_or(SerialSink::Stdout, SerialSink::File);
            match Vm::restore(&dir, serial) {
                Ok(vm) => {
                    eprintln!(
                        "ftvmm: restored {} in {:.3}s",
                        dir.display(),
                        vm.uptime().as_secs_f64()
                    );
                    run_until_stopped(vm, control)
                }
                Err(e) => {
                    eprintln!("ftvmm: cannot restore {}: {e}", dir.display());
                    ExitCode::from(2)
                }
            }
        }
        Command::Ctl { sock, request } => {
            let request = match request {
                CtlCommand::Status => ControlRequest::Status,
                CtlCommand::Pause => ControlRequest::Pause,
                CtlCommand::Resume => ControlRequest::Resume,
                CtlCommand::Capture { name } => ControlRequest::Capture { name },
                CtlCommand::Harvest { pages_file } => ControlRequest::Harvest { pages_file },
                CtlCommand::Counters => ControlRequest::Counters,
            };
            match control::request(&sock, &request) {
                Ok(answer) => {
                    println!("{}", serde_json::to_string(&answer).expect("serialisable"));
                    if matches!(answer, control::ControlResponse::Error { .. }) {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Command::Host => match vmm::kvm_host::probe() {
            Ok((_, host)) => {
                println!("{}", serde_json::to_string(&host).expect("serialisable"));
                if !host.flavor.runs_stock_guests() {
                    eprintln!(
                        "ftvmm: /dev/kvm is served by {}: it cannot boot an unmodified Linux guest; \
                         run guests on a host with kvm_amd or kvm_intel (or in a lab node)",
                        host.flavor
                    );
                    return ExitCode::from(3);
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ftvmm: {e}");
                ExitCode::from(2)
            }
        },
        Command::Selftest { iterations } => match vmm::selftest::run(iterations) {
            Ok(report) => {
                println!("{}", serde_json::to_string(&report).expect("serialisable"));
                if report.passed {
                    ExitCode::SUCCESS
                } else {
                    eprintln!(
                        "ftvmm: self-test guest reported {:?}, expected {} (halted: {})",
                        report.reported, report.expected, report.halted
                    );
                    ExitCode::FAILURE
                }
            }
            Err(e) => {
                eprintln!("ftvmm: self-test failed: {e}");
                ExitCode::from(2)
            }
        },
    }
}
