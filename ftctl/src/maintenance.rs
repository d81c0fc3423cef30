//! `ftctl node maintenance enter|exit NODE`: asks the API, then follows the
//! node's maintenance until the step is done (the VMs moved off, or back
//! and protected), printing each change of what it waits for.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use clap::{Args, Subcommand};
use serde_json::Value;

use ftd_client::client::ApiClient;
use ftd_client::model::NodeView;

use crate::api_commands::{emit, print_json, CommandError};

/// How often the node is read while following a step.
const LOOK_EVERY: Duration = Duration::from_secs(1);

#[derive(Subcommand, Debug)]
pub enum MaintenanceCommand {
    /// Take the node out of service: its FT VMs switch over to the peer,
    /// its HA VMs migrate there (nothing lost), and it keeps no standby; then pulling or rebooting
    /// it affects no VM. Refused while the peer is down or in maintenance.
    Enter(StepArgs),
    /// Bring the node back into service: its standbys start, and the VMs
    /// that prefer it switch back once protected.
    Exit(StepArgs),
}

#[derive(Args, Debug)]
pub struct StepArgs {
    /// The node's name.
    name: String,
    /// Answer once the API took the request, without following it.
    #[arg(long)]
    no_wait: bool,
    /// Give up following after this many seconds (the step goes on).
    #[arg(long, default_value_t = 600, value_name = "SECONDS")]
    timeout: u64,
}

pub fn run(
    client: &ApiClient,
    json: bool,
    command: MaintenanceCommand,
) -> Result<(), CommandError> {
    let (args, target, answer): (StepArgs, &str, Value) = match command {
        MaintenanceCommand::Enter(args) => {
            let answer = client.enter_maintenance(&args.name)?;
            (args, "on", answer)
        }
        MaintenanceCommand::Exit(args) => {
            let answer = client.exit_maintenance(&args.name)?;
            (args, "off", answer)
        }
    };
    if args.no_wait {
        if json {
            return print_json(&answer);
        }
        let node: NodeView = serde_json::from_value(answer).map_err(CommandError::DecodeAnswer)?;
        return emit(&format!(
            "node {}: maintenance {}\n",
            node.name, node.maintenance
        ));
    }
    let started = Instant::now();
    let mut said = BTreeSet::new();
    let mut state = String::new();
    let mut last_error = String::new();
    loop {
        match client.node::<Value>(&args.name) {
            Ok(raw) => {
                let node: NodeView =
                    serde_json::from_value(raw.clone()).map_err(CommandError::DecodeAnswer)?;
                if node.maintenance != state {
                    state = node.maintenance.clone();
                    eprintln!("node {}: maintenance {state}", node.name);
                }
                for line in &node.maintenance_waiting {
                    if said.insert(line.clone()) {
                        eprintln!("  {line}");
                    }
                }
                if node.maintenance == target {
                    if json {
                        return print_json(&raw);
                    }
                    let took = started.elapsed().as_secs_f64();
                    return emit(&format!(
                        "node {}: {} ({took:.1} s)\n",
                        node.name,
                        if target == "on" {
                            "in maintenance: no VM runs there"
                        } else {
                            "back in service"
                        }
                    ));
                }
            }
            // The node that answered may be restarting: say it once and
            // keep following.
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    eprintln!("  (cannot read node {}: {e})", args.name);
                    last_error = e;
                }
            }
        }
        if started.elapsed() > Duration::from_secs(args.timeout) {
            return Err(CommandError::StepTimeout {
                node: args.name,
                target: target.to_string(),
                secs: args.timeout,
                state,
            });
        }
        std::thread::sleep(LOOK_EVERY);
    }
}
