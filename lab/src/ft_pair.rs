//! A protected VM across the lab pair: each node gets a bridge joining the
//! guest's TAP to its business NIC and the pair secret; the primary runs
//! `ftprotect run` (a guest serving the ledger on its data disk), the
//! standby `ftprotect standby`. Their FT status is asked on the control
//! socket each serves in its node (`ftprotect ctl ... status`).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use replicator::status::{FtState, Role, Status};

use crate::lab::{Lab, LabError};
use crate::topology::NodeId;

/// Where the FT processes keep their files inside a node.
const FT_DIR: &str = "/data/ft";
const RUN_DIR: &str = "/tmp/ft";
/// The control socket of the node's ftprotect (in [`RUN_DIR`]).
const CONTROL_SOCK: &str = "/tmp/ft/ftprotect.sock";
/// The A-link port the standby listens on.
pub const ALINK_PORT: u16 = 7800;
/// The port of the second (backup) path, over the business network.
pub const BACKUP_PORT: u16 = 7801;
/// The ledger's TCP port in the guest.
pub const LEDGER_PORT: u16 = 7000;
const GUEST_MAC: &str = "52:54:00:f7:00:64";
const GUEST_TAP: &str = "fttap0";
const VM_NAME: &str = "ledger-vm";
/// The lab's pair secret (a lab is a test bed; real pairs generate theirs).
const LAB_SECRET: &str = "ftlab-pair-secret-not-for-production";
pub const GUEST_MEM_MIB: u64 = 128;
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum FtPairError {
    #[error(transparent)]
    Lab(#[from] LabError),
    #[error("setting up node {node} failed: {detail}")]
    Setup { node: NodeId, detail: String },
    #[error(
        "node {node} did not reach {what} within {secs} s; last status: {last}; log tail:\n{log}"
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

fn sh(lab: &Lab, node: NodeId, script: &str) -> Result<String, FtPairError> {
    let out = lab.exec(node, &["sh", "-c", script], EXEC_TIMEOUT)?;
    if out.exit_code() != 0 {
        return Err(FtPairError::Setup {
            node,
            detail: format!(
                "`{script}` exited {}: {}",
                out.exit_code(),
                out.stderr.trim()
            ),
        });
    }
    Ok(out.stdout)
}

/// Bridge, TAP-less for now (ftprotect puts its TAP on it), secret, folders.
pub fn prepare_node(lab: &Lab, node: NodeId) -> Result<(), FtPairError> {
    let ip = lab.topo.biz_ip(node);
    sh(
        lab,
        node,
        &format!(
            "mkdir -p {FT_DIR} {RUN_DIR} && printf %s '{LAB_SECRET}' > {FT_DIR}/secret && \
             if ! [ -e /sys/class/net/br0 ]; then \
               ip link add br0 type bridge && ip link set biz master br0 && ip addr flush dev biz && \
               ip addr add {ip}/24 dev br0 && ip link set br0 up; fi"
        ),
    )?;
    Ok(())
}

/// The addresses where `node`'s standby listens: the A-link, then the
/// business network as the backup path.
fn standby_addresses(lab: &Lab, node: NodeId) -> String {
    format!(
        "{}:{ALINK_PORT},{}:{BACKUP_PORT}",
        lab.topo.alink_ip(node),
        lab.topo.biz_ip(node)
    )
}

fn common_args(lab: &Lab, node: NodeId) -> String {
    format!(
        "--vm-name {VM_NAME} --node node-{node} --secret-file {FT_DIR}/secret \
         --peer {} --bridge br0 --control-sock {CONTROL_SOCK} \
         --serial-log {RUN_DIR}/console.log",
        standby_addresses(lab, node.peer())
    )
}

/// Boots the ledger guest on `node` as the primary (a fresh data disk).
pub fn start_primary(lab: &Lab, node: NodeId, extra: &str) -> Result<(), FtPairError> {
    let ip = guest_ip(lab);
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet ftguest.ip={ip}/24 \
         ftguest.run=/bin/ft-ledger,{LEDGER_PORT},/data/ledger.log"
    );
    sh(
        lab,
        node,
        &format!(
            "cp /images/guest-data.ext4 {FT_DIR}/disk.img && \
             (ftprotect run {} --kernel /images/vmlinux --initrd /images/guest-initramfs.cpio.gz \
              --cmdline '{cmdline}' --mem-mib {GUEST_MEM_MIB} --disk {FT_DIR}/disk.img \
              --net tap={GUEST_TAP},mac={GUEST_MAC} {extra} > {RUN_DIR}/ftprotect.log 2>&1 &)",
            common_args(lab, node)
        ),
    )?;
    Ok(())
}

/// Starts `node` as the standby.
pub fn start_standby(lab: &Lab, node: NodeId, extra: &str) -> Result<(), FtPairError> {
    let listen = standby_addresses(lab, node);
    sh(
        lab,
        node,
        &format!(
            "(ftprotect standby {} --listen {listen} --disk {FT_DIR}/disk.img \
              --tap {GUEST_TAP} {extra} > {RUN_DIR}/ftprotect.log 2>&1 &)",
            common_args(lab, node)
        ),
    )?;
    Ok(())
}

/// The FT status of `node`'s ftprotect, asked on its control socket (None
/// if none answers, e.g. none runs).
pub fn status(lab: &Lab, node: NodeId) -> Option<Status> {
    let out = lab
        .exec(
            node,
            &["ftprotect", "ctl", "--sock", CONTROL_SOCK, "status"],
            EXEC_TIMEOUT,
        )
        .ok()?;
    if out.exit_code() != 0 {
        return None;
    }
    serde_json::from_str(&out.stdout).ok()
}

/// The tail of `node`'s ftprotect log.
pub fn log_tail(lab: &Lab, node: NodeId) -> String {
    lab.exec(
        node,
        &["sh", "-c", &format!("tail -n 30 {RUN_DIR}/ftprotect.log")],
        EXEC_TIMEOUT,
    )
    .map(|o| o.stdout)
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
    let start = Instant::now();
    let mut last = "none".to_string();
    loop {
        if let Some(s) = status(lab, node) {
            if s.role == role && s.state == state {
                return Ok(s);
            }
            last = serde_json::to_string(&s).unwrap_or_else(|e| e.to_string());
        }
        if start.elapsed() > timeout {
            return Err(FtPairError::Timeout {
                node,
                what: format!("{role} {state}"),
                secs: timeout.as_secs(),
                last,
                log: log_tail(lab, node),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Brings up the pair with the ledger VM protected: primary on `primary`.
pub fn protect(lab: &Lab, primary: NodeId, extra: &str) -> Result<Status, FtPairError> {
    for node in NodeId::ALL {
        prepare_node(lab, node)?;
    }
    start_standby(lab, primary.peer(), extra)?;
    start_primary(lab, primary, extra)?;
    wait_for(
        lab,
        primary,
        Role::Primary,
        FtState::Protected,
        Duration::from_secs(180),
    )
}
