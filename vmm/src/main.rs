//! `ftvmm`: the VMM binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "ftvmm", about = "rust-vmm based VMM of the FT pair")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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
