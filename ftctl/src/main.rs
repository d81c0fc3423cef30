//! `ftctl`: the command-line tool of the FT pair and of its lab.
//!
//! - `ftctl node|vm|events|audit ...` speak a node manager's REST API
//!   ([`api_commands`], the `ftd-client` crate), like `virsh` does libvirt's.
//! - `ftctl images ...` and `ftctl lab ...` build images and run the
//!   two-node lab on this machine.

mod api_commands;
mod maintenance;
mod output;
mod user_commands;

use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use lab::topology::DEFAULT_LAB;
use lab::{drill, ft_pair, images, smoke, Lab, LabError, LinkId, NodeId};
use output::outln;

#[derive(Parser)]
#[command(name = "ftctl", about = "Control a fault-tolerant VM pair and its lab")]
struct Cli {
    #[command(flatten)]
    api: api_commands::ApiArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Api(api_commands::ApiCommand),
    /// Guest and lab images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
    },
    /// The two-node lab on this machine.
    Lab {
        /// Which lab (several can run side by side).
        #[arg(long, global = true, default_value = DEFAULT_LAB)]
        lab: String,
        #[command(subcommand)]
        command: LabCommand,
    },
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// Build what is missing (cached on its inputs) and print the paths.
    Build,
}

#[derive(Subcommand)]
enum LabCommand {
    /// Start the lab's nodes (those not running yet).
    Up {
        /// Start only these nodes (default: a and b).
        #[arg(long = "node")]
        nodes: Vec<NodeId>,
    },
    /// Stop every node and remove the lab's devices and files.
    Down,
    /// Show nodes, links and console logs.
    Status,
    /// Print the shell settings that point `ftctl` at the lab's API
    /// (`eval "$(ftctl lab env)"`): both nodes' addresses, `--node`'s
    /// first (ftctl uses the next when one cannot be reached).
    Env {
        /// The node whose API to try first.
        #[arg(long, default_value = "a")]
        node: NodeId,
    },
    /// Run a command inside a node; prints its output, exits with its code.
    Exec {
        node: NodeId,
        /// Seconds before the command is killed.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        #[arg(last = true, required = true)]
        argv: Vec<String>,
    },
    /// Power-cut a node (its QEMU is killed).
    Pull { node: NodeId },
    /// Cut a link (alink or biz) on both nodes, or on one (--node: biz
    /// then cuts that node off the business network, witness included,
    /// while the other keeps it; a one-node cut is not kept across that
    /// node's reboot).
    Cut {
        link: LinkId,
        #[arg(long)]
        node: Option<NodeId>,
    },
    /// Restore a cut link (on both nodes, or on one).
    Heal {
        link: LinkId,
        #[arg(long)]
        node: Option<NodeId>,
    },
    /// Stop or start the lab's quorum witness (ftwitness on this host).
    Witness { action: WitnessAction },
    /// Start the pair (if needed), then through node a's API define the
    /// ledger VM (afresh), start it on node a, and once its guest serves,
    /// protect it at the level (node b's daemon starts the standby) and
    /// wait until it is protected.
    Protect {
        /// ft: checkpoints (the standby resumes the VM); ha: the disks
        /// mirrored (the standby reboots the VM from its mirror).
        #[arg(long, value_enum, default_value = "ft")]
        level: api_commands::ProtectLevelArg,
        /// The standby takes over after this much silence (ms).
        #[arg(long)]
        heartbeat_timeout_ms: Option<u64>,
        /// Keep the guest paused until each checkpoint is acknowledged.
        #[arg(long)]
        synchronous: bool,
    },
    /// Show the FT engine's status of the ledger VM on both nodes (JSON,
    /// from each node's API; null where no role of it runs).
    FtStatus,
    /// Run N failover drills on the protected ledger VM (the lab is started
    /// afresh): at a random moment pull the primary, cut every path
    /// between the nodes or freeze an engine, check the ledger and that one copy ran at a
    /// time, bring the node back or heal, re-protect. Prints a table,
    /// writes a JSON report.
    Drill {
        #[arg(long, default_value_t = 5)]
        count: u32,
        /// pull: power-cut the primary; partition: cut every path between
        /// the nodes for 1-5 s (the witness stays on the host); mixed: both
        /// at random; freeze-standby / freeze-primary: SIGSTOP that node's
        /// engine for 0.2-3 s, then SIGCONT; switchover: a planned
        /// switchover (at level ha: a live migration).
        #[arg(long, value_enum, default_value = "pull")]
        fault: drill::Fault,
        /// Where the JSON report goes (default: the lab's folder).
        #[arg(long)]
        report: Option<std::path::PathBuf>,
        /// The ledger VM's protection level: ft (resumed on the survivor)
        /// or ha (rebooted there from its mirror; pull and switchover
        /// faults only).
        #[arg(long, value_enum, default_value = "ft")]
        level: api_commands::ProtectLevelArg,
        /// Level ft: the primary's delta cache (MiB; default 64; 0 sends
        /// every dirty page and the VM's state whole).
        #[arg(long, value_name = "MIB")]
        delta_cache_mib: Option<u64>,
        /// Bring the lab down when the drill ends (otherwise it stays up,
        /// the VM protected, for a look at what the drill left).
        #[arg(long)]
        down: bool,
    },
    /// Boot a node, check kvm_amd in it, run a ring-0 test guest, report.
    Smoke {
        /// Loop turns of the test guest.
        #[arg(long, default_value_t = 20_000_000)]
        iterations: u32,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum WitnessAction {
    Start,
    Stop,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Api(command) => return api(&cli.api, command),
        Command::Images {
            command: ImagesCommand::Build,
        } => build_images(),
        Command::Lab { lab, command } => Lab::open(&lab).and_then(|lab| lab_command(&lab, command)),
    };
    match result {
        // The command did its work, but its output was lost.
        Ok(_) if output::failed() => ExitCode::FAILURE,
        Ok(code) => code,
        Err(e) => {
            eprintln!("ftctl: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs an API command: exit 0 on success, 1 when the API refuses or
/// cannot be reached, 2 for usage errors (as clap's).
fn api(args: &api_commands::ApiArgs, command: api_commands::ApiCommand) -> ExitCode {
    match api_commands::run(args, command) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader went away: the rest of the output was not wanted.
        Err(api_commands::CommandError::Output(e)) if output::reader_gone(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ftctl: error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

fn build_images() -> Result<ExitCode, LabError> {
    let (images, took) = images::build()?;
    outln!(
        "{}",
        serde_json::to_string_pretty(&images).expect("serialisable")
    );
    eprintln!("ftctl: images ready in {:.1}s", took.as_secs_f64());
    Ok(ExitCode::SUCCESS)
}

fn lab_command(lab: &Lab, command: LabCommand) -> Result<ExitCode, LabError> {
    match command {
        LabCommand::Up { nodes } => {
            let nodes = if nodes.is_empty() {
                NodeId::ALL.to_vec()
            } else {
                nodes
            };
            lab.up(&nodes)?;
            print_status(lab)?;
        }
        LabCommand::Down => {
            lab.down()?;
            outln!("lab {} is down", lab.topo.name);
        }
        LabCommand::Status => print_status(lab)?,
        LabCommand::Env { node } => print_env(lab, node),
        LabCommand::Exec {
            node,
            timeout,
            argv,
        } => {
            let out = lab.exec(node, &argv, Duration::from_secs(timeout))?;
            output::out(format_args!("{}", out.stdout));
            eprint!("{}", out.stderr);
            if out.timed_out {
                eprintln!("ftctl: command killed after {timeout}s");
            }
            return Ok(ExitCode::from(out.exit_code().clamp(0, 255) as u8));
        }
        LabCommand::Pull { node } => {
            lab.pull(node)?;
            outln!("node {node} pulled (power cut)");
        }
        LabCommand::Cut { link, node: None } => {
            lab.set_link(link, false)?;
            outln!("link {link} cut");
        }
        LabCommand::Cut {
            link,
            node: Some(node),
        } => {
            lab.set_node_link(node, link, false)?;
            outln!("link {link} cut on node {node}");
        }
        LabCommand::Heal { link, node: None } => {
            lab.set_link(link, true)?;
            outln!("link {link} healed");
        }
        LabCommand::Heal {
            link,
            node: Some(node),
        } => {
            lab.set_node_link(node, link, true)?;
            outln!("link {link} healed on node {node}");
        }
        LabCommand::Witness {
            action: WitnessAction::Stop,
        } => {
            if lab.stop_witness() {
                outln!("witness stopped");
            } else {
                outln!("the witness was not running");
            }
        }
        LabCommand::Witness {
            action: WitnessAction::Start,
        } => {
            let pid = lab.start_witness()?;
            outln!("witness running (pid {pid})");
        }
        LabCommand::Protect {
            level,
            heartbeat_timeout_ms,
            synchronous,
        } => {
            lab.up(&NodeId::ALL)?;
            let ft = ftd_client::model::FtOptions {
                heartbeat_timeout_ms,
                synchronous,
                ..Default::default()
            };
            let started = std::time::Instant::now();
            match ft_pair::protect_at(lab, NodeId::A, level.as_str(), ft) {
                Ok(status) => {
                    outln!("{}", serde_json::to_string_pretty(&status).expect("json"));
                    outln!(
                        "ledger VM protected at level {} in {:.1} s: primary a, standby b; ledger at {}\n\
                         the API: eval \"$(ftctl lab env)\"; ftctl vm show {}; \
                         `ftctl lab pull a` to fail it over, `ftctl lab up --node a` to bring \
                         it back (its daemon re-protects the VM by itself)",
                        level.as_str(),
                        started.elapsed().as_secs_f64(),
                        ft_pair::ledger_addr(lab),
                        ft_pair::VM_NAME,
                    );
                }
                Err(e) => {
                    eprintln!("ftctl: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        LabCommand::FtStatus => {
            for node in NodeId::ALL {
                // `null` when no ftprotect answers on the node's control socket.
                let status = ft_pair::status(lab, node);
                outln!(
                    "node {node}: {}",
                    serde_json::to_string_pretty(&status).expect("json")
                );
            }
        }
        LabCommand::Drill {
            count,
            fault,
            report,
            level,
            delta_cache_mib,
            down,
        } => {
            let path = report.unwrap_or_else(|| lab.topo.dir.join("drill-report.json"));
            let level = match level {
                api_commands::ProtectLevelArg::Ft => drill::Level::Ft,
                api_commands::ProtectLevelArg::Ha => drill::Level::Ha,
            };
            let ft = ftd_client::model::FtOptions {
                delta_cache_mib,
                ..Default::default()
            };
            let outcome = drill::run_with(lab, (count, fault), level, ft, &path);
            if down {
                if let Err(e) = lab.down() {
                    eprintln!("ftctl: bringing the lab down after the drill failed: {e}");
                }
            } else {
                // A lab left running loads this host: a benchmark started
                // next would measure against it.
                eprintln!(
                    "ftctl: the lab stays up with the VM protected; `ftctl lab down` when done"
                );
            }
            match outcome {
                Ok(report) => {
                    output::out(format_args!("{}", drill::table(&report)));
                    outln!("report: {}", path.display());
                    if !report.passed {
                        return Ok(ExitCode::FAILURE);
                    }
                }
                Err(e) => {
                    eprintln!("ftctl: drill failed: {e}");
                    return Ok(ExitCode::FAILURE);
                }
            }
        }
        LabCommand::Smoke { iterations } => {
            let report = smoke::run(iterations)?;
            outln!(
                "{}",
                serde_json::to_string_pretty(&report).expect("serialisable")
            );
            let selftest = report.selftest.as_ref();
            outln!(
                "smoke: node booted in {:.1}s (kernel uptime {:.1}s), kvm module {}, nested paging {}, \
                 ring-0 guest {} ({} ns/iteration)",
                report.boot_secs,
                report.kernel_uptime_secs,
                report.kvm_module.as_deref().unwrap_or("none"),
                report.nested_paging,
                if report.passed() { "passed" } else { "FAILED" },
                selftest.map_or("?".into(), |s| format!("{:.1}", s["ns_per_iteration"].as_f64().unwrap_or(f64::NAN))),
            );
            for failure in &report.failures {
                eprintln!("smoke: FAILED: {failure}");
            }
            if !report.passed() {
                return Ok(ExitCode::FAILURE);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `export` lines for FTCTL_API and FTCTL_TOKEN_FILE (the token is made
/// at the lab's first `up`).
fn print_env(lab: &Lab, node: NodeId) {
    let token = lab.topo.api_token_file();
    let apis = format!(
        "{},{}",
        lab.topo.api_url(node),
        lab.topo.api_url(node.peer())
    );
    outln!("export FTCTL_API={}", shell_quote(&apis));
    outln!(
        "export FTCTL_TOKEN_FILE={}",
        shell_quote(&token.to_string_lossy())
    );
    if !token.exists() {
        eprintln!(
            "ftctl: {} is made at the lab's first start (`ftctl lab up`)",
            token.display()
        );
    }
}

/// `s` as one word for a POSIX shell.
fn shell_quote(s: &str) -> String {
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-:+@,=".contains(&b));
    if plain {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

fn print_status(lab: &Lab) -> Result<(), LabError> {
    let status = lab.status()?;
    let topo = &lab.topo;
    if !status.dir.exists() {
        outln!(
            "lab {} is not up (start it with `ftctl lab up`)",
            status.name
        );
        return Ok(());
    }
    outln!("lab {} (files in {})", status.name, status.dir.display());
    for n in &status.nodes {
        let state = match (n.pid, &n.agent) {
            (Some(pid), Some(agent)) => format!("running, pid {pid}, agent answers ({agent})"),
            (Some(pid), None) => format!("running, pid {pid}, agent not answering"),
            (None, _) => "down".into(),
        };
        outln!(
            "node {}: {state}; business {} A-link {}; console {}",
            n.node,
            topo.biz_ip(n.node),
            topo.alink_ip(n.node),
            n.console.display()
        );
    }
    for (link, up) in &status.links {
        let detail = match link {
            LinkId::Alink => "UDP socket between the nodes".to_string(),
            LinkId::Biz => format!(
                "bridge {} with the host at {}",
                topo.bridge(),
                topo.host_biz_ip()
            ),
        };
        outln!("link {link}: {} ({detail})", if *up { "up" } else { "CUT" });
    }
    Ok(())
}
