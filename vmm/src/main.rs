//! `ftvmm`: the VMM binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use vmm::boot::BootSource;
use vmm::vm::{SerialSink, Vm, VmConfig};
use vmm::vm_event::VmEvent;

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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            kernel,
            initrd,
            cmdline,
            vcpus,
            mem_mib,
            serial_log,
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
            };
            let vm = match Vm::boot(config) {
                Ok(vm) => vm,
                Err(e) => {
                    eprintln!("ftvmm: {e}");
                    return ExitCode::from(2);
                }
            };
            let started = vm.started;
            let event = vm.wait();
            let secs = started.elapsed().as_secs_f64();
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
