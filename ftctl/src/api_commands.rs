//! The commands that speak the node manager's REST API: `node`, `vm`,
//! `events` and `audit`. Tables for people by default; `--json` prints
//! the API's JSON as it answered, for scripts.

use std::collections::BTreeSet;
use std::io::{self, Read};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand, ValueEnum};
use serde::Serialize;
use serde_json::Value;

use ftd_client::client::{ApiClient, ClientError, EventQuery, EventStream, SseMessage, MAX_EVENTS};
use ftd_client::model::{
    AuditEntry, DiskSpec, Event, FtOptions, NicSpec, NodeView, VmCreate, VmView,
};

/// Where the API is and how `ftctl` answers (global options).
#[derive(Args, Debug)]
#[command(next_help_heading = "API options")]
pub struct ApiArgs {
    /// The API of the pair (http://HOST:PORT; both nodes' separated by a
    /// comma: the next is tried when one cannot be reached).
    #[arg(long, global = true, env = "FTCTL_API", value_name = "URL")]
    pub api: Option<String>,
    /// The file holding the API's bearer token (the node's api-token).
    #[arg(long, global = true, env = "FTCTL_TOKEN_FILE", value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Print the API's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The API's commands.
#[derive(Subcommand, Debug)]
pub enum ApiCommand {
    /// The pair's nodes.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// VMs: define, show, start, stop, protect, delete.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// The event log (alerts flagged), or its live stream with --follow.
    Events(EventsArgs),
    /// The web console's users.
    User {
        #[command(subcommand)]
        command: crate::user_commands::UserCommand,
    },
    /// The audit log: every mutating API request.
    Audit {
        /// At most this many (the newest), 1-1000.
        #[arg(long)]
        limit: Option<usize>,
    },
}

#[derive(Subcommand, Debug)]
pub enum NodeCommand {
    /// List the pair's nodes.
    List,
    /// Show one node.
    Show { name: String },
    /// Take a node out of service and bring it back (its VMs move to the
    /// peer and return); follows the step until it is done.
    Maintenance {
        #[command(subcommand)]
        command: crate::maintenance::MaintenanceCommand,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCommand {
    /// List the VMs.
    List,
    /// Show one VM.
    Show { name: String },
    /// Define a VM (it stays stopped until started).
    Create(Box<VmCreateArgs>),
    /// Delete a stopped VM: its definition, and its files on both nodes.
    Delete { name: String },
    /// Start a VM on its preferred node (at level ft with its standby).
    Start { name: String },
    /// Stop a VM on both nodes.
    Stop { name: String },
    /// Protect a VM at level ft (checkpoints: resumed on the peer without
    /// a reboot) or ha (disks mirrored: rebooted on the peer). A running
    /// VM changes level without a reboot (unprotected until its standby is
    /// synchronised at the new level).
    Protect {
        name: String,
        #[arg(long, value_enum, default_value = "ft")]
        level: ProtectLevelArg,
    },
    /// Run a VM unprotected (its standby stops).
    Unprotect { name: String },
    /// Force a takeover the quorum witness cannot grant (ask the node
    /// whose standby waits for it: FTCTL_API or --api). Only when the
    /// witness cannot be brought back and the other node is surely down:
    /// forced while the other node runs the VM, both run it.
    Takeover { name: String },
    /// Move a protected FT VM's primary role to its standby (a planned
    /// switchover: nothing lost, no heartbeat timeout; the node it leaves
    /// becomes its standby). An HA VM moves by live migration (its memory
    /// copied while it runs, then the switchover): this returns once it
    /// began (`ftctl events` says when it moved). Sent to the node running
    /// the primary.
    Switchover { name: String },
}

/// How a VM is protected.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum LevelArg {
    /// Fault tolerant: a standby on the peer holds every checkpoint.
    Ft,
    /// High availability: the disks mirrored to the peer, which reboots
    /// the VM from its mirror when this node is lost.
    Ha,
    /// On one node only.
    Unprotected,
}

impl LevelArg {
    fn as_str(self) -> &'static str {
        match self {
            LevelArg::Ft => "ft",
            LevelArg::Ha => "ha",
            LevelArg::Unprotected => "unprotected",
        }
    }
}

/// The levels `vm protect` sets.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum ProtectLevelArg {
    /// Fault tolerant (checkpoints).
    Ft,
    /// High availability (mirrored disks, reboot on the peer).
    Ha,
}

impl ProtectLevelArg {
    pub fn as_str(self) -> &'static str {
        match self {
            ProtectLevelArg::Ft => "ft",
            ProtectLevelArg::Ha => "ha",
        }
    }
}

#[derive(Args, Debug)]
pub struct VmCreateArgs {
    /// The VM's name (lower-case letters, digits, '-'); with --from-json,
    /// the body's name when it has none.
    #[arg(required_unless_present = "from_json")]
    name: Option<String>,
    /// The guest kernel: an absolute path on both nodes.
    #[arg(
        long,
        required_unless_present = "from_json",
        conflicts_with = "from_json"
    )]
    kernel: Option<String>,
    /// An initrd: an absolute path on both nodes.
    #[arg(long, conflicts_with = "from_json")]
    initrd: Option<String>,
    /// The kernel command line.
    #[arg(long, conflicts_with = "from_json")]
    cmdline: Option<String>,
    /// vCPUs (1-8).
    #[arg(long, conflicts_with = "from_json")]
    vcpus: Option<u8>,
    /// Memory in MiB.
    #[arg(long, conflicts_with = "from_json")]
    memory_mib: Option<u64>,
    /// A disk: size=MIB (empty) or image=PATH (a copy); repeat for more.
    #[arg(long = "disk", value_name = "size=MIB|image=PATH", value_parser = parse_disk, conflicts_with = "from_json")]
    disks: Vec<DiskSpec>,
    /// A NIC on the node's bridge: mac=MAC, or auto; repeat for more.
    #[arg(long = "nic", value_name = "mac=MAC|auto", value_parser = parse_nic, conflicts_with = "from_json")]
    nics: Vec<NicSpec>,
    /// The protection level (default ft).
    #[arg(long, value_enum, conflicts_with = "from_json")]
    level: Option<LevelArg>,
    /// The node it starts on (default: the node answering).
    #[arg(long, value_name = "NODE", conflicts_with = "from_json")]
    preferred_node: Option<String>,
    /// Level ft: the standby takes over after this much silence (ms).
    #[arg(long, value_name = "MS", conflicts_with = "from_json")]
    heartbeat_timeout_ms: Option<u64>,
    /// Level ft: keep the guest paused until each checkpoint is
    /// acknowledged.
    #[arg(long, conflicts_with = "from_json")]
    synchronous: bool,
    /// Level ft: shortest and longest checkpoint interval (ms).
    #[arg(long, value_name = "MS", conflicts_with = "from_json")]
    min_interval_ms: Option<u64>,
    #[arg(long, value_name = "MS", conflicts_with = "from_json")]
    max_interval_ms: Option<u64>,
    /// Level ft: checkpoints sent and not yet acknowledged, at most (1-64;
    /// default 4; 1: each waits for the last one's acknowledgement).
    #[arg(long, value_name = "N", conflicts_with = "from_json")]
    epochs_in_flight: Option<u32>,
    /// A checkpoint (level ha: a batch of disk writes) not acknowledged
    /// this long drops the standby, and the VM goes on unprotected (ms;
    /// default 5000).
    #[arg(long, value_name = "MS", conflicts_with = "from_json")]
    ack_deadline_ms: Option<u64>,
    /// Level ft: the primary's delta cache (MiB; default 64; 0 sends every
    /// dirty page and the VM's state whole).
    #[arg(long, value_name = "MIB", conflicts_with = "from_json")]
    delta_cache_mib: Option<u64>,
    /// A VmCreate body (JSON) instead of the options; '-' reads stdin.
    #[arg(long, value_name = "FILE")]
    from_json: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct EventsArgs {
    /// Only this VM's events.
    #[arg(long, value_name = "NAME")]
    vm: Option<String>,
    /// Only alerts.
    #[arg(long)]
    alerts: bool,
    /// At most this many (the newest), 1-1000.
    #[arg(long)]
    limit: Option<usize>,
    /// Then print events as they happen, until interrupted (with --json,
    /// one event per line).
    #[arg(long)]
    follow: bool,
}

/// What went wrong in an API command.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The API could not be asked, or refused.
    #[error(transparent)]
    Api(#[from] ClientError),
    /// The `--from-json` body cannot be read.
    #[error("cannot read the VM definition {path}: {source}")]
    ReadBody { path: PathBuf, source: io::Error },
    /// The `--from-json` body is not a JSON object.
    #[error("the VM definition {path} is not a JSON object: {reason}")]
    BadBody { path: PathBuf, reason: String },
    /// The name given differs from the `--from-json` body's (`in_body` as
    /// JSON).
    #[error("the name {given:?} differs from the name {in_body} in {path}")]
    NameMismatch {
        given: String,
        in_body: String,
        path: PathBuf,
    },
    /// The API sent an event that is not one as `ftctl` knows it.
    #[error("the API sent an event ftctl cannot read: {0}")]
    DecodeEvent(#[source] serde_json::Error),
    /// The API's answer is not what `ftctl` knows.
    #[error("the API's answer is not one ftctl can read: {0}")]
    DecodeAnswer(#[source] serde_json::Error),
    /// A maintenance step did not end while followed.
    #[error(
        "node {node} did not reach maintenance {target} within {secs} s (it is {state}); \
         the step goes on: see `ftctl node show {node}`"
    )]
    StepTimeout {
        node: String,
        target: String,
        secs: u64,
        state: String,
    },
    /// The password cannot be read.
    #[error("cannot read the password: {0}")]
    Password(#[source] io::Error),
    /// The password was not typed the same twice.
    #[error("the two passwords differ")]
    PasswordsDiffer,
    /// The output cannot be written (a closed pipe).
    #[error("cannot write the output: {0}")]
    Output(#[source] io::Error),
}

impl CommandError {
    /// The exit code: 2 for usage errors (like clap's), 1 for the rest.
    pub fn exit_code(&self) -> u8 {
        match self {
            CommandError::Api(e) if e.is_usage() => 2,
            CommandError::NameMismatch { .. } => 2,
            _ => 1,
        }
    }
}

/// Runs an API command.
pub fn run(args: &ApiArgs, command: ApiCommand) -> Result<(), CommandError> {
    let client = ApiClient::new(args.api.as_deref(), args.token_file.as_deref())?;
    let json = args.json;
    match command {
        ApiCommand::Node { command } => node_command(&client, json, command),
        ApiCommand::Vm { command } => vm_command(&client, json, command),
        ApiCommand::User { command } => crate::user_commands::run(&client, json, command),
        ApiCommand::Events(events) if events.follow => follow_events(&client, json, &events),
        ApiCommand::Events(events) => {
            let query = EventQuery {
                vm: events.vm,
                alerts: events.alerts,
                after: None,
                limit: events.limit,
            };
            if json {
                return print_json(&client.events::<Value>(&query)?);
            }
            let events: Vec<Event> = client.events(&query)?;
            emit(&EventTable::new(&events).render(&events))
        }
        ApiCommand::Audit { limit } => {
            if json {
                return print_json(&client.audit::<Value>(limit)?);
            }
            let entries: Vec<AuditEntry> = client.audit(limit)?;
            emit(&audit_table(&entries))
        }
    }
}

fn node_command(client: &ApiClient, json: bool, command: NodeCommand) -> Result<(), CommandError> {
    match command {
        NodeCommand::List if json => print_json(&client.nodes::<Value>()?),
        NodeCommand::List => {
            let nodes: Vec<NodeView> = client.nodes()?;
            let rows = nodes
                .iter()
                .map(|n| {
                    vec![
                        n.name.clone(),
                        n.state.clone(),
                        yes_no(n.local).to_string(),
                        n.maintenance.clone(),
                        names(&n.primaries),
                        names(&n.standbys),
                    ]
                })
                .collect::<Vec<_>>();
            emit(&table(
                &[
                    "NAME",
                    "STATE",
                    "LOCAL",
                    "MAINTENANCE",
                    "PRIMARIES",
                    "STANDBYS",
                ],
                &rows,
            ))
        }
        NodeCommand::Show { name } if json => print_json(&client.node::<Value>(&name)?),
        NodeCommand::Show { name } => {
            let node: NodeView = client.node(&name)?;
            emit(&fields(&[
                ("name", node.name.clone()),
                ("state", node.state.clone()),
                ("local", yes_no(node.local).to_string()),
                ("api", node.api.clone()),
                ("alink", names(&node.alink)),
                (
                    "last seen",
                    node.last_seen_unix_ms.map_or_else(|| "-".into(), utc_time),
                ),
                ("primaries", names(&node.primaries)),
                ("standbys", names(&node.standbys)),
                ("maintenance", node.maintenance.clone()),
                ("maintenance by", or_dash(node.maintenance_by.as_deref())),
                (
                    "maintenance since",
                    node.maintenance_since_unix_ms
                        .map_or_else(|| "-".into(), utc_time),
                ),
                (
                    "waiting for",
                    if node.maintenance_waiting.is_empty() {
                        "-".to_string()
                    } else {
                        node.maintenance_waiting.join("; ")
                    },
                ),
            ]))
        }
        NodeCommand::Maintenance { command } => crate::maintenance::run(client, json, command),
    }
}

fn vm_command(client: &ApiClient, json: bool, command: VmCommand) -> Result<(), CommandError> {
    match command {
        VmCommand::List if json => print_json(&client.vms::<Value>()?),
        VmCommand::List => {
            let vms: Vec<VmView> = client.vms()?;
            let rows = vms
                .iter()
                .map(|vm| {
                    vec![
                        vm.name.clone(),
                        vm.state.clone(),
                        vm.level.clone(),
                        or_dash(vm.primary_node.as_deref()),
                        or_dash(vm.standby_node.as_deref()),
                        vm.generation.to_string(),
                    ]
                })
                .collect::<Vec<_>>();
            emit(&table(
                &["NAME", "STATE", "LEVEL", "PRIMARY", "STANDBY", "GENERATION"],
                &rows,
            ))
        }
        VmCommand::Show { name } if json => print_json(&client.vm::<Value>(&name)?),
        VmCommand::Show { name } => emit(&vm_details(&client.vm(&name)?)),
        VmCommand::Create(create) => {
            let body = create_body(*create)?;
            let vm: Value = client.create_vm(&body)?;
            vm_answer(json, vm, |vm| {
                format!(
                    "VM {} defined: level {}, {}, preferred node {}",
                    vm.name, vm.level, vm.state, vm.definition.preferred_node
                )
            })
        }
        VmCommand::Delete { name } => {
            client.delete_vm(&name)?;
            if json {
                Ok(())
            } else {
                emit(&format!("VM {name} deleted\n"))
            }
        }
        VmCommand::Start { name } => vm_answer(json, client.start_vm(&name)?, |vm| {
            format!(
                "VM {}: {} on {} (generation {})",
                vm.name,
                vm.state,
                or_dash(vm.primary_node.as_deref()),
                vm.generation
            )
        }),
        VmCommand::Stop { name } => vm_answer(json, client.stop_vm(&name)?, |vm| {
            format!("VM {}: {}", vm.name, vm.state)
        }),
        VmCommand::Protect { name, level } => vm_answer(
            json,
            client.protect_vm(&name, level.as_str())?,
            level_changed,
        ),
        VmCommand::Unprotect { name } => {
            vm_answer(json, client.unprotect_vm(&name)?, level_changed)
        }
        VmCommand::Switchover { name } => vm_answer(json, client.switchover_vm(&name)?, |vm| {
            if vm.level == "ha" {
                return format!(
                    "VM {}: live migration from {} begun (memory is copied while it runs, then \
                     it switches over; `ftctl events` says when it moved)",
                    vm.name,
                    or_dash(vm.primary_node.as_deref())
                );
            }
            format!(
                "VM {}: switched over; its primary runs on {} (generation {})",
                vm.name,
                or_dash(vm.primary_node.as_deref()),
                vm.generation
            )
        }),
        VmCommand::Takeover { name } => vm_answer(json, client.force_takeover(&name)?, |vm| {
            format!(
                "VM {}: its standby takes over without the witness's grant",
                vm.name
            )
        }),
    }
}

fn level_changed(vm: &VmView) -> String {
    format!("VM {}: level {}, {}", vm.name, vm.level, vm.state)
}

/// Prints the VM the API answered: as JSON, or as the line `say` makes
/// (the API's JSON when it is not a VM as `ftctl` knows it).
fn vm_answer(json: bool, vm: Value, say: impl Fn(&VmView) -> String) -> Result<(), CommandError> {
    if json {
        return print_json(&vm);
    }
    match serde_json::from_value::<VmView>(vm.clone()) {
        Ok(view) => emit(&format!("{}\n", say(&view))),
        Err(_) => print_json(&vm),
    }
}

/// The body of `POST /api/vms`.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum CreateBody {
    /// Made from the options.
    Options(Box<VmCreate>),
    /// Read from `--from-json`, sent as it is (the name filled in).
    Json(Value),
}

/// The `POST /api/vms` body: from `--from-json`, or from the options.
fn create_body(create: VmCreateArgs) -> Result<CreateBody, CommandError> {
    let Some(path) = create.from_json else {
        // clap requires the name and the kernel without --from-json.
        return Ok(CreateBody::Options(Box::new(VmCreate {
            name: create.name.unwrap_or_default(),
            kernel: create.kernel.unwrap_or_default(),
            initrd: create.initrd,
            cmdline: create.cmdline,
            vcpus: create.vcpus,
            memory_mib: create.memory_mib,
            disks: create.disks,
            nics: create.nics,
            level: create.level.map(|l| l.as_str().to_string()),
            preferred_node: create.preferred_node,
            ft: Some(FtOptions {
                heartbeat_timeout_ms: create.heartbeat_timeout_ms,
                synchronous: create.synchronous,
                min_interval_ms: create.min_interval_ms,
                max_interval_ms: create.max_interval_ms,
                epochs_in_flight: create.epochs_in_flight,
                no_pulses: false,
                ack_deadline_ms: create.ack_deadline_ms,
                delta_cache_mib: create.delta_cache_mib,
            })
            .filter(|ft| *ft != FtOptions::default()),
        })));
    };
    let text = if path.as_os_str() == "-" {
        let mut text = String::new();
        io::stdin()
            .read_to_string(&mut text)
            .map(|_| text)
            .map_err(|source| CommandError::ReadBody {
                path: path.clone(),
                source,
            })?
    } else {
        std::fs::read_to_string(&path).map_err(|source| CommandError::ReadBody {
            path: path.clone(),
            source,
        })?
    };
    let mut body: Value = serde_json::from_str(&text).map_err(|e| CommandError::BadBody {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    let found = match &body {
        Value::Object(_) => "an object",
        Value::Array(_) => "an array",
        Value::String(_) => "a string",
        Value::Number(_) => "a number",
        Value::Bool(_) => "a boolean",
        Value::Null => "null",
    };
    let Some(object) = body.as_object_mut() else {
        return Err(CommandError::BadBody {
            path,
            reason: format!("it is {found}"),
        });
    };
    if let Some(given) = create.name {
        match object.get("name") {
            None => {
                object.insert("name".into(), Value::String(given));
            }
            Some(Value::String(in_body)) if *in_body == given => {}
            Some(in_body) => {
                return Err(CommandError::NameMismatch {
                    given,
                    in_body: in_body.to_string(),
                    path,
                })
            }
        }
    }
    Ok(CreateBody::Json(body))
}

/// Parses `--disk size=MIB` or `--disk image=PATH`.
fn parse_disk(spec: &str) -> Result<DiskSpec, String> {
    let mut disk = DiskSpec {
        size_mib: None,
        image: None,
    };
    for part in spec.split(',') {
        match part.split_once('=') {
            Some(("size", mib)) => {
                let mib = mib
                    .parse()
                    .map_err(|_| format!("size={mib}: not a number of MiB"))?;
                disk.size_mib = Some(mib);
            }
            Some(("image", path)) if !path.is_empty() => disk.image = Some(path.to_string()),
            _ => return Err(format!("{part:?}: give size=MIB or image=PATH")),
        }
    }
    Ok(disk)
}

/// Parses `--nic mac=MAC` or `--nic auto`.
fn parse_nic(spec: &str) -> Result<NicSpec, String> {
    match spec.split_once('=') {
        _ if spec == "auto" => Ok(NicSpec { mac: None }),
        Some(("mac", mac)) if !mac.is_empty() => Ok(NicSpec {
            mac: Some(mac.to_string()),
        }),
        _ => Err(format!("{spec:?}: give mac=MAC or auto")),
    }
}

/// A VM for a person: its state, then its definition.
fn vm_details(vm: &VmView) -> String {
    let d = &vm.definition;
    let disks = d
        .disks
        .iter()
        .map(|disk| match (&disk.image, disk.size_mib) {
            (Some(image), _) => format!("image {image}"),
            (None, Some(mib)) => format!("{mib} MiB"),
            (None, None) => "?".into(),
        })
        .collect::<Vec<_>>();
    let roles = vm
        .roles
        .iter()
        .map(|r| {
            let mut role = format!(
                "{} {} on {}, epoch {}, peer {}",
                r.role,
                r.state,
                r.node,
                r.epoch.map_or_else(|| "-".into(), |e| e.to_string()),
                or_dash(r.peer.as_deref())
            );
            if let Some(message) = &r.message {
                role.push_str(&format!(" ({message})"));
            }
            role
        })
        .collect::<Vec<_>>();
    fields(&[
        ("name", vm.name.clone()),
        (
            "state",
            if vm.migrating {
                format!("{} (migrating to its standby's node)", vm.state)
            } else {
                vm.state.clone()
            },
        ),
        ("desired", vm.desired.clone()),
        ("level", vm.level.clone()),
        ("primary", or_dash(vm.primary_node.as_deref())),
        ("standby", or_dash(vm.standby_node.as_deref())),
        ("generation", vm.generation.to_string()),
        (
            "epoch",
            vm.epoch.map_or_else(|| "-".into(), |e| e.to_string()),
        ),
        ("message", or_dash(vm.message.as_deref())),
        (
            "warning",
            if vm.warnings.is_empty() {
                "-".into()
            } else {
                vm.warnings.join("; ")
            },
        ),
        (
            "roles",
            if roles.is_empty() {
                "-".into()
            } else {
                roles.join("; ")
            },
        ),
        ("vcpus", d.vcpus.to_string()),
        ("memory", format!("{} MiB", d.memory_mib)),
        ("kernel", d.kernel.clone()),
        ("initrd", or_dash(d.initrd.as_deref())),
        ("cmdline", d.cmdline.clone()),
        ("disks", names(&disks)),
        ("nics", names(&d.nics)),
        ("preferred node", d.preferred_node.clone()),
        ("slot", d.slot.to_string()),
    ])
}

fn audit_table(entries: &[AuditEntry]) -> String {
    let rows = entries
        .iter()
        .map(|e| {
            vec![
                utc_time(e.unix_ms),
                e.node.clone(),
                e.who.clone(),
                e.action.clone(),
                e.status.to_string(),
                e.result.clone(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &["TIME", "NODE", "WHO", "ACTION", "STATUS", "RESULT"],
        &rows,
    )
}

/// The events table; its column widths are kept while following, so
/// that rows printed later line up with the first ones.
struct EventTable {
    widths: Vec<usize>,
}

impl EventTable {
    const HEADERS: [&'static str; 6] = ["TIME", "NODE", "SEVERITY", "ALERT", "VM", "MESSAGE"];

    fn new(events: &[Event]) -> EventTable {
        // Room for typical node and VM names, so that later rows line up.
        let mut widths = vec![20, 8, 8, 5, 12, 0];
        for row in events.iter().map(EventTable::row) {
            for (w, cell) in widths.iter_mut().zip(&row) {
                *w = (*w).max(cell.chars().count());
            }
        }
        EventTable { widths }
    }

    fn row(e: &Event) -> Vec<String> {
        vec![
            utc_time(e.unix_ms),
            e.node.clone(),
            e.severity.clone(),
            yes_no(e.alert).to_string(),
            or_dash(e.vm.as_deref()),
            e.message.clone(),
        ]
    }

    fn header(&self) -> String {
        let cells = EventTable::HEADERS.map(String::from);
        line(&self.widths, &cells)
    }

    fn line(&self, e: &Event) -> String {
        line(&self.widths, &EventTable::row(e))
    }

    fn render(&self, events: &[Event]) -> String {
        let mut out = self.header();
        for e in events {
            out.push_str(&self.line(e));
        }
        out
    }
}

/// `events --follow`: the backlog, then each event as the stream brings
/// it. When the stream drops, reconnects and reads what it missed from
/// `/api/events?after=<last id>`.
fn follow_events(client: &ApiClient, json: bool, args: &EventsArgs) -> Result<(), CommandError> {
    let filter = EventQuery {
        vm: args.vm.clone(),
        alerts: args.alerts,
        after: None,
        limit: args.limit,
    };
    // Subscribe first, then read the backlog: nothing falls in between
    // (what both bring is printed once, by id).
    let mut stream = client.event_stream()?;
    let backlog: Vec<Value> = client.events(&filter)?;
    let backlog = typed_events(backlog)?;
    let mut follower = Follower {
        json,
        filter,
        table: EventTable::new(&backlog.iter().map(|(e, _)| e.clone()).collect::<Vec<_>>()),
        last_id: 0,
        printed: BTreeSet::new(),
    };
    // Where the log stands, for catching up when nothing matched yet.
    let newest: Vec<Event> = client.events(&EventQuery {
        limit: Some(1),
        ..EventQuery::default()
    })?;
    follower.last_id = newest.last().map_or(0, |e| e.id);
    if !json {
        emit(&follower.table.header())?;
    }
    follower.print_all(backlog)?;
    loop {
        let why = match stream.next_message() {
            Ok(Some(message)) => {
                follower.on_message(client, message)?;
                continue;
            }
            Ok(None) => "ended".to_string(),
            Err(e) => format!("dropped ({e})"),
        };
        eprintln!("ftctl: the event stream {why}; reconnecting");
        stream = reconnect(client)?;
        follower.catch_up(client)?;
    }
}

/// Opens the event stream again, waiting for the daemon as long as it
/// is out of reach; an API refusal ends the wait.
fn reconnect(client: &ApiClient) -> Result<EventStream, CommandError> {
    let mut pause = Duration::from_millis(250);
    loop {
        match client.event_stream() {
            Ok(stream) => {
                eprintln!("ftctl: reconnected to {}", client.base());
                return Ok(stream);
            }
            Err(e) if e.is_unreachable() => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// How many printed ids `events --follow` keeps to skip repeats (the
/// stream and the catch-up bring the same events only close together).
const PRINTED_IDS_KEPT: usize = 4096;

/// What `events --follow` has printed.
struct Follower {
    json: bool,
    filter: EventQuery,
    table: EventTable,
    /// The newest event id seen (printed or filtered out).
    last_id: u64,
    /// The latest ids printed, so that no event is printed twice.
    printed: BTreeSet<u64>,
}

impl Follower {
    fn on_message(&mut self, client: &ApiClient, message: SseMessage) -> Result<(), CommandError> {
        match message.event.as_str() {
            "event" | "alert" => {
                // Not an event as ftctl knows it: skip it, the log keeps it.
                let Ok(raw) = serde_json::from_str::<Value>(&message.data) else {
                    return Ok(());
                };
                let Ok(event) = serde_json::from_value::<Event>(raw.clone()) else {
                    return Ok(());
                };
                let wanted = self
                    .filter
                    .vm
                    .as_ref()
                    .is_none_or(|vm| event.vm.as_ref() == Some(vm))
                    && (!self.filter.alerts || event.alert);
                if wanted {
                    self.print(&event, &raw)?;
                }
                self.last_id = self.last_id.max(event.id);
                Ok(())
            }
            // The daemon dropped some for this slow reader: read them.
            "lagged" => self.catch_up(client),
            _ => Ok(()),
        }
    }

    /// Prints what happened after the last event seen.
    fn catch_up(&mut self, client: &ApiClient) -> Result<(), CommandError> {
        let missed: Vec<Value> = client.events(&EventQuery {
            after: Some(self.last_id),
            limit: Some(MAX_EVENTS),
            ..self.filter.clone()
        })?;
        if missed.len() >= MAX_EVENTS {
            eprintln!("ftctl: more than {MAX_EVENTS} events were missed; the oldest are not shown");
        }
        self.print_all(typed_events(missed)?)
    }

    fn print_all(&mut self, events: Vec<(Event, Value)>) -> Result<(), CommandError> {
        for (event, raw) in events {
            self.print(&event, &raw)?;
            self.last_id = self.last_id.max(event.id);
        }
        Ok(())
    }

    fn print(&mut self, event: &Event, raw: &Value) -> Result<(), CommandError> {
        if !self.printed.insert(event.id) {
            return Ok(());
        }
        while self.printed.len() > PRINTED_IDS_KEPT {
            self.printed.pop_first();
        }
        if self.json {
            // One event per line (JSON lines), for `jq` and friends.
            emit(&format!("{raw}\n"))
        } else {
            emit(&self.table.line(event))
        }
    }
}

/// Events with their JSON as the API sent it.
fn typed_events(events: Vec<Value>) -> Result<Vec<(Event, Value)>, CommandError> {
    events
        .into_iter()
        .map(|raw| {
            serde_json::from_value::<Event>(raw.clone())
                .map(|e| (e, raw))
                .map_err(CommandError::DecodeEvent)
        })
        .collect()
}

/// An aligned table: two spaces between columns, the last one unpadded.
fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = line(
        &widths,
        &headers.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
    );
    for row in rows {
        out.push_str(&line(&widths, row));
    }
    out
}

fn line(widths: &[usize], cells: &[String]) -> String {
    let mut out = String::new();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        if i + 1 == cells.len() {
            out.push_str(cell);
        } else {
            out.push_str(cell);
            let pad = width.saturating_sub(cell.chars().count()) + 2;
            out.extend(std::iter::repeat_n(' ', pad));
        }
    }
    let mut out = out.trim_end().to_string();
    out.push('\n');
    out
}

/// `key: value` lines, the values aligned.
fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    pairs
        .iter()
        .map(|(k, v)| format!("{:<width$} {v}\n", format!("{k}:")))
        .collect()
}

fn names(list: &[String]) -> String {
    if list.is_empty() {
        "-".into()
    } else {
        list.join(",")
    }
}

fn or_dash(value: Option<&str>) -> String {
    value.unwrap_or("-").to_string()
}

fn yes_no(flag: bool) -> &'static str {
    if flag {
        "yes"
    } else {
        "no"
    }
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC) of a time in ms since the Unix epoch.
fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (year, month, day) = civil_date(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// Prints JSON for scripts (pretty, one document).
pub(crate) fn print_json(value: &Value) -> Result<(), CommandError> {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    emit(&format!("{text}\n"))
}

/// Writes to stdout at once (and flushes, for --follow); a failure ends
/// the command (`main` ends it quietly when the reader went away).
pub(crate) fn emit(text: &str) -> Result<(), CommandError> {
    crate::output::write(format_args!("{text}")).map_err(CommandError::Output)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc_dates() {
        assert_eq!(utc_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29T00:00:00Z");
        assert_eq!(utc_time(1_700_000_000_999), "2023-11-14T22:13:20Z");
        assert_eq!(utc_time(4_107_542_399_000), "2100-02-28T23:59:59Z");
    }

    #[test]
    fn tables_are_aligned() {
        let text = table(
            &["NAME", "STATE"],
            &[
                vec!["ledger-vm".into(), "stopped".into()],
                vec!["a".into(), "protected".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME       STATE\nledger-vm  stopped\na          protected\n"
        );
    }

    #[test]
    fn disk_and_nic_options_are_parsed() {
        assert_eq!(
            parse_disk("size=16").unwrap(),
            DiskSpec {
                size_mib: Some(16),
                image: None
            }
        );
        assert_eq!(
            parse_disk("image=/srv/disk.img").unwrap(),
            DiskSpec {
                size_mib: None,
                image: Some("/srv/disk.img".into())
            }
        );
        for bad in ["16", "size=x", "image=", "colour=red"] {
            assert!(parse_disk(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_nic("auto").unwrap(), NicSpec { mac: None });
        assert_eq!(
            parse_nic("mac=52:54:00:00:00:01").unwrap().mac.as_deref(),
            Some("52:54:00:00:00:01")
        );
        for bad in ["", "mac=", "52:54:00:00:00:01"] {
            assert!(parse_nic(bad).is_err(), "{bad}");
        }
    }
}
