//! `ftvmm`: the VMM binary.

use std::process::ExitCode;

use std::path::PathBuf;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use vmm::config::{BootSource, DiskConfig, FeatureSet, NetConfig, SerialSink, VmConfig, VmEvent};
use vmm::control::{self, ControlRequest};
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
        /// Serve the control socket here (pause, resume, capture, harvest, counters).
        #[arg(long)]
        api_sock: Option<PathBuf>,
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
    },
    /// Continue a VM captured with `ftvmm ctl capture` in this process.
    Restore {
        /// The capture directory (state.json, memory.bin).
        dir: PathBuf,
        /// Serial console to this file (default: stdout).
        #[arg(long)]
        serial_log: Option<PathBuf>,
        #[arg(long)]
        api_sock: Option<PathBuf>,
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

#[derive(Subcommand)]
enum CtlCommand {
    Status,
    Pause,
    Resume,
    /// Pause, capture state and memory into DIR, resume.
    Capture {
        dir: PathBuf,
    },
    /// Pause, harvest the dirty pages, resume; optionally list them in a file.
    Harvest {
        #[arg(long)]
        pages_file: Option<PathBuf>,
    },
    Counters,
}

/// Runs `vm` (serving its control socket) until the guest stops.
fn run_until_stopped(vm: Vm, api_sock: Option<PathBuf>) -> ExitCode {
    let vm = Arc::new(vm);
    if let Some(path) = &api_sock {
        if let Err(e) = control::serve(path, Arc::clone(&vm)) {
            eprintln!("ftvmm: {e}");
            return ExitCode::from(2);
        }
    }
    let event = vm.wait();
    let secs = vm.uptime().as_secs_f64();
    if let Some(path) = &api_sock {
        let _ = std::fs::remove_file(path);
    }
    match event {
        VmEvent::Reset | VmEvent::Shutdown => {
            eprintln!("ftvmm: guest stopped ({event:?}) after {secs:.3}s");
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
            api_sock,
            disks,
            nets,
            cpu_features,
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
            };
            match Vm::boot(config) {
                Ok(vm) => run_until_stopped(vm, api_sock),
                Err(e) => {
                    eprintln!("ftvmm: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::Restore {
            dir,
            serial_log,
            api_sock,
        } => {
            let serial = serial_log.map_or(SerialSink::Stdout, SerialSink::File);
            match Vm::restore(&dir, serial) {
                Ok(vm) => {
                    eprintln!(
                        "ftvmm: restored {} in {:.3}s",
                        dir.display(),
                        vm.uptime().as_secs_f64()
                    );
                    run_until_stopped(vm, api_sock)
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
                CtlCommand::Capture { dir } => ControlRequest::Capture { dir },
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
                Err(e) => {
                    eprintln!("ftvmm: {e}");
                    ExitCode::from(2)
                }
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
