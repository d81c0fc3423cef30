//! A protected VM across the lab pair, driven through the product's API:
//! each lab node runs `ftd` from boot (images/node/rcS), the two daemons
//! pair over the business network, and the lab defines and starts the
//! ledger VM through a node's REST API like any user would (ftd starts
//! the primary and the peer's standby, and re-protects after a pull).
//! The engine's detailed status of a node's role is read from that node's
//! API (`GET /api/vms/{name}/engine`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use ftd_client::model::{DiskSpec, FtOptions, NicSpec, NodeView, VmCreate, VmView};
use ftd_client::{ApiClient, ClientError};
use replicator::status::{FtState, Role, Status};

use crate::lab::{Lab, LabError};
use crate::topology::NodeId;

/// The ledger's TCP port in the guest.
pub const LEDGER_PORT: u16 = 7000;
/// The lab's protected VM.
pub const VM_NAME: &str = "ledger-vm";
const GUEST_MAC: &str = "52:54:00:f7:00:64";
pub const GUEST_MEM_MIB: u64 = 128;
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the daemons may take to answer and pair after a node boots.
const PAIR_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, thiserror::Error)]
pub enum FtPairError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("the API of node {node}: {source}")]
    Api {
        node: NodeId,
        #[source]
        source: ClientError,
    },
    #[error(
        "node {node} did not reach {what} within {secs} s; last seen: {last}; log tail:\n{log}"
    )]
    Timeout {
        node: NodeId,
        what: String,
        secs: u64,
        last: String,
        log: String,
    },
}

/// The guest's address on the business network.
pub fn guest_ip(lab: &Lab) -> Ipv4Addr {
    let o = lab.topo.host_biz_ip().octets();
    Ipv4Addr::new(o[0], o[1], o[2], 100)
}

pub fn ledger_addr(lab: &Lab) -> SocketAddr {
    SocketAddr::new(guest_ip(lab).into(), LEDGER_PORT)
}

/// The lab's name of a node's daemon ("node-a").
pub fn node_name(node: NodeId) -> String {
    format!("node-{node}")
}

/// A client of `node`'s API with the lab's token.
pub fn api(lab: &Lab, node: NodeId) -> Result<ApiClient, FtPairError> {
    let token = lab.topo.api_token_file();
    ApiClient::new(Some(&lab.topo.api_url(node)), Some(&token))
        .map_err(|source| FtPairError::Api { node, source })
}

fn api_err(node: NodeId) -> impl FnOnce(ClientError) -> FtPairError {
    move |source| FtPairError::Api { node, source }
}

/// The ledger VM's definition: the guest kernel and initramfs from the
/// images disk, the ledger on a copy of the empty data disk.
pub fn ledger_vm(lab: &Lab, preferred: NodeId, level: &str, ft: FtOptions) -> VmCreate {
    ledger_vm_with(lab, preferred, level, ft, &LedgerLoad::default())
}

/// What else the ledger VM is given: vCPUs, and a program the guest runs
/// next to the ledger (`ftguest.also`, e.g. the memory dirtier).
#[derive(Debug, Clone, Default)]
pub struct LedgerLoad {
    pub vcpus: Option<u8>,
    /// PROGRAM,ARG,... as `ftguest.also` takes it.
    pub also: Option<String>,
}

/// [`ledger_vm`] with more vCPUs or a second program in the guest.
pub fn ledger_vm_with(
    lab: &Lab,
    preferred: NodeId,
    level: &str,
    ft: FtOptions,
    load: &LedgerLoad,
) -> VmCreate {
    let ip = guest_ip(lab);
    let also = load
        .also
        .as_ref()
        .map_or_else(String::new, |a| format!(" ftguest.also={a}"));
    VmCreate {
        name: VM_NAME.into(),
        kernel: "/images/vmlinux".into(),
        initrd: Some("/images/guest-initramfs.cpio.gz".into()),
        cmdline: Some(format!(
            "console=ttyS0 reboot=k panic=1 quiet ftguest.ip={ip}/24{also} ftguest.fsck=1 \
             ftguest.run=/bin/ft-ledger,{LEDGER_PORT},/data/ledger.log"
        )),
        vcpus: Some(load.vcpus.unwrap_or(1)),
        memory_mib: Some(GUEST_MEM_MIB),
        disks: vec![DiskSpec {
            size_mib: None,
            image: Some("/images/guest-data.ext4".into()),
        }],
        nics: vec![NicSpec {
            mac: Some(GUEST_MAC.into()),
        }],
        level: Some(level.into()),
        preferred_node: Some(node_name(preferred)),
        ft: Some(ft).filter(|ft| *ft != FtOptions::default()),
    }
}

/// Waits until `node`'s daemon answers and sees its peer up.
pub fn wait_paired(lab: &Lab, node: NodeId) -> Result<(), FtPairError> {
    let client = api(lab, node)?;
    let start = Instant::now();
    loop {
        let last = match client.nodes::<Vec<NodeView>>() {
            Ok(nodes) if nodes.len() == 2 && nodes.iter().all(|n| n.state == "up") => return Ok(()),
            Ok(nodes) => format!("{nodes:?}"),
            Err(e) => e.to_string(),
        };
        if start.elapsed() > PAIR_TIMEOUT {
            return Err(FtPairError::Timeout {
                node,
                what: "its daemon paired with the peer".into(),
                secs: PAIR_TIMEOUT.as_secs(),
                last,
                log: log_tail(lab, node),
            });
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The ledger VM as `node`'s API shows it (None if it is not defined).
pub fn vm(lab: &Lab, node: NodeId) -> Result<Option<VmView>, FtPairError> {
    match api(lab, node)?.vm::<VmView>(VM_NAME) {
        Ok(v) => Ok(Some(v)),
        Err(ClientError::Refused { status: 404, .. }) => Ok(None),
        Err(e) => Err(FtPairError::Api { node, source: e }),
    }
}

/// A planned switchover of the ledger VM, asked of `node`'s API (the
/// client sends it on to the node running the primary); the VM as the
/// answer shows it.
pub fn switchover(lab: &Lab, node: NodeId) -> Result<VmView, FtPairError> {
    api(lab, node)?
        .switchover_vm::<VmView>(VM_NAME)
        .map_err(api_err(node))
}

/// Stops (waiting until it is stopped everywhere) and deletes the ledger
/// VM if it is defined.
pub fn remove_vm(lab: &Lab, via: NodeId) -> Result<(), FtPairError> {
    let client = api(lab, via)?;
    let Some(view) = vm(lab, via)? else {
        return Ok(());
    };
    if view.desired == "running" {
        client.stop_vm::<VmView>(VM_NAME).map_err(api_err(via))?;
    }
    let start = Instant::now();
    loop {
        match client.delete_vm(VM_NAME) {
            Ok(()) => return Ok(()),
            // Still stopping on a node.
            Err(ClientError::Refused { status: 409, .. })
                if start.elapsed() < Duration::from_secs(60) =>
            {
                std::thread::sleep(Duration::from_millis(300))
            }
            Err(e) => {
                return Err(FtPairError::Api {
                    node: via,
                    source: e,
                })
            }
        }
    }
}

/// Defines the ledger VM (afresh) and starts it on `primary`, through
/// `primary`'s API.
pub fn define_and_start(
    lab: &Lab,
    primary: NodeId,
    level: &str,
    ft: FtOptions,
) -> Result<VmView, FtPairError> {
    define_and_start_with(lab, primary, level, ft, &LedgerLoad::default())
}

/// [`define_and_start`] with a [`LedgerLoad`].
pub fn define_and_start_with(
    lab: &Lab,
    primary: NodeId,
    level: &str,
    ft: FtOptions,
    load: &LedgerLoad,
) -> Result<VmView, FtPairError> {
    for node in NodeId::ALL {
        wait_paired(lab, node)?;
    }
    remove_vm(lab, primary)?;
    let client = api(lab, primary)?;
    client
        .create_vm::<VmView>(&ledger_vm_with(lab, primary, level, ft, load))
        .map_err(api_err(primary))?;
    client.start_vm::<VmView>(VM_NAME).map_err(api_err(primary))
}

/// Brings up the pair with the ledger VM protected at level FT, primary
/// on `primary`; returns the primary's engine status once protected.
pub fn protect(lab: &Lab, primary: NodeId, ft: FtOptions) -> Result<Status, FtPairError> {
    protect_at(lab, primary, "ft", ft)
}

/// How long the ledger VM's guest may take to boot and serve, unprotected.
/// It serves in about 13 s on a slow TCG lab node.
pub const BOOT_WITHIN: Duration = Duration::from_secs(120);

/// [`protect`] at `level` (`ft` or `ha`: at ha, "protected" means the
/// standby's mirror is whole).
///
/// The VM is defined (with `ft`'s options) and started unprotected; once
/// its guest serves the ledger it is protected at `level` (the product's
/// level change of a running VM: node b's daemon starts the standby, which
/// synchronises with the booted guest). A guest that boots under FT runs
/// a few times slower on a TCG lab node (every epoch stops it, and the
/// standby falling behind pauses it): over a minute against 13 s.
/// [`define_and_start`] at `ft` keeps the guest protected from its first
/// instruction.
pub fn protect_at(
    lab: &Lab,
    primary: NodeId,
    level: &str,
    ft: FtOptions,
) -> Result<Status, FtPairError> {
    define_and_start(lab, primary, "unprotected", ft)?;
    crate::lab::progress(format_args!(
        "the ledger VM runs unprotected on node {primary}: waiting for its guest to serve"
    ));
    wait_serving(lab, primary, BOOT_WITHIN)?;
    crate::lab::progress(format_args!(
        "the guest serves: protecting it at level {level}"
    ));
    api(lab, primary)?
        .protect_vm::<VmView>(VM_NAME, level)
        .map_err(api_err(primary))?;
    wait_for_level(
        lab,
        primary,
        (Role::Primary, FtState::Protected, level),
        Duration::from_secs(240),
    )
}

/// Waits until the ledger VM's guest accepts a connection on the ledger's
/// port (`primary` runs it: its log tail goes in the error).
pub fn wait_serving(lab: &Lab, primary: NodeId, within: Duration) -> Result<(), FtPairError> {
    let addr = ledger_addr(lab);
    let start = Instant::now();
    loop {
        let error = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            Ok(_) => return Ok(()),
            Err(e) => e,
        };
        if start.elapsed() > within {
            return Err(FtPairError::Timeout {
                node: primary,
                what: format!("its guest serving the ledger at {addr}"),
                secs: within.as_secs(),
                last: error.to_string(),
                log: log_tail(lab, primary),
            });
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The engine status of the ledger VM's role on `node`, from that node's
/// API (None if it does not answer or runs no role of it).
pub fn status(lab: &Lab, node: NodeId) -> Option<Status> {
    let client = api(lab, node).ok()?;
    client.vm_engine::<Status>(VM_NAME).ok()
}

/// The tails of `node`'s daemon log, of its ledger VM role's log and of
/// the guest's console.
pub fn log_tail(lab: &Lab, node: NodeId) -> String {
    log_tails(lab, node, 15, 20)
}

/// The guest console's last lines [`log_tails`] shows: a guest that
/// panicked and rebooted says why there (the engine only sees the reset).
const GUEST_CONSOLE_LINES: usize = 20;

/// The last `daemon` lines of `node`'s daemon log, the last `engine`
/// lines of its ledger VM role's log and the last lines of the ledger
/// guest's console there (appended to boot after boot).
pub fn log_tails(lab: &Lab, node: NodeId, daemon: usize, engine: usize) -> String {
    let logs = lab
        .exec(
            node,
            &[
                "sh",
                "-c",
                &format!(
                    "echo '--- ftd'; tail -n {daemon} /data/ftd/ftd.log; \
                     echo '--- {VM_NAME}'; tail -n {engine} /data/ftd/vms/{VM_NAME}/ftprotect.log"
                ),
            ],
            EXEC_TIMEOUT,
        )
        .map(|o| o.stdout)
        .unwrap_or_default();
    format!(
        "{logs}--- {VM_NAME} guest console\n{}",
        guest_console(lab, node, GUEST_CONSOLE_LINES)
    )
}

/// The last `lines` lines of the ledger guest's console on `node`, as
/// printable text (a console holds terminal control bytes; the node's
/// busybox `tr` knows no character classes), or why they cannot be read.
pub fn guest_console(lab: &Lab, node: NodeId, lines: usize) -> String {
    lab.exec(
        node,
        &[
            "tail",
            "-n",
            &lines.to_string(),
            &format!("/data/ftd/vms/{VM_NAME}/console.log"),
        ],
        EXEC_TIMEOUT,
    )
    .map_or_else(
        |e| e.to_string(),
        |o| {
            format!("{}{}", o.stdout, o.stderr)
                .chars()
                .filter(|c| !c.is_control() || *c == '\n')
                .collect()
        },
    )
}

/// The ledger VM's console lines on `node` that say how its data disk's
/// check went at each boot (`ftguest.fsck`: "ftguest: e2fsck DEV: clean"
/// or "... NOT clean"); the console log is appended to, boot after boot.
pub fn disk_checks(lab: &Lab, node: NodeId) -> Vec<String> {
    let console = format!("/data/ftd/vms/{VM_NAME}/console.log");
    lab.exec(
        node,
        &[
            "sh",
            "-c",
            &format!("grep -a 'ftguest: e2fsck' {console} || true"),
        ],
        EXEC_TIMEOUT,
    )
    .map(|o| o.stdout.lines().map(str::to_string).collect())
    .unwrap_or_default()
}

/// Waits until `node` reports `role` in `state`; returns its status.
pub fn wait_for(
    lab: &Lab,
    node: NodeId,
    role: Role,
    state: FtState,
    timeout: Duration,
) -> Result<Status, FtPairError> {
    wait_until(lab, node, (role, state, None), timeout)
}

/// [`wait_for`] at protection level `level` (`ft`, `ha`): a level change
/// is only done once the engine reports the new level.
pub fn wait_for_level(
    lab: &Lab,
    node: NodeId,
    (role, state, level): (Role, FtState, &str),
    timeout: Duration,
) -> Result<Status, FtPairError> {
    wait_until(lab, node, (role, state, Some(level)), timeout)
}

fn wait_until(
    lab: &Lab,
    node: NodeId,
    (role, state, level): (Role, FtState, Option<&str>),
    timeout: Duration,
) -> Result<Status, FtPairError> {
    let start = Instant::now();
    let mut last = "none".to_string();
    loop {
        if let Some(s) = status(lab, node) {
            let at_level = level.is_none_or(|l| s.level.as_str() == l);
            if s.role == role && s.state == state && at_level {
                return Ok(s);
            }
            last = serde_json::to_string(&s).unwrap_or_else(|e| e.to_string());
        }
        if start.elapsed() > timeout {
            return Err(FtPairError::Timeout {
                node,
                what: match level {
                    Some(level) => format!("{role} {state} at level {level}"),
                    None => format!("{role} {state}"),
                },
                secs: timeout.as_secs(),
                last,
                log: log_tail(lab, node),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
