//! A lab node is a QEMU TCG virtual machine with emulated AMD SVM, so that
//! real `kvm_amd` runs inside it. This module starts and kills them.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::agent::AGENT_PORT;
use crate::images::Images;
use crate::lab::LabSecrets;
use crate::topology::{Nic, NodeId, Topology};

pub const QEMU: &str = "qemu-system-x86_64";

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("cannot run {QEMU} (run `ftctl images build`, which installs it): {0}")]
    Spawn(#[source] std::io::Error),
    #[error("QEMU for node {node} failed to start: {stderr}")]
    Start { node: NodeId, stderr: String },
    #[error("QEMU for node {node} started but wrote no pid file {path}")]
    NoPid { node: NodeId, path: PathBuf },
    #[error("QEMU process {pid} did not die after SIGKILL")]
    Unkillable { pid: u32 },
}

/// The QEMU command line of `node`.
pub fn command(topo: &Topology, images: &Images, node: NodeId, secrets: &LabSecrets) -> Command {
    let peer = node.peer();
    // The lab's secret and token travel on the kernel command line: the
    // node reads them once to set up its daemon (a lab is a test bed; on
    // real servers `ftd join` copies them).
    // `mitigations=off`: the node's CPU is emulated (TCG), which does not
    // speculate, so the speculation mitigations its kernel would pick for
    // the EPYC model it sees defend nothing here; under emulation they
    // multiply the cost of every VM exit its KVM takes (a return thunk on
    // each return, the return-stack fill at each exit), which in the lab
    // is most of what a protected guest pays. A real server keeps its
    // kernel's defaults.
    let mut append = format!(
        "console=ttyS0 quiet panic=-1 mitigations=off ftlab.node={node} ftlab.alink={}/24 ftlab.biz={}/24 \
         ftlab.peer={peer} ftlab.peer_alink={} ftlab.peer_biz={} ftlab.secret={} ftlab.token={}",
        topo.alink_ip(node),
        topo.biz_ip(node),
        topo.alink_ip(peer),
        topo.biz_ip(peer),
        secrets.pair_secret,
        secrets.api_token,
    );
    if topo.witness {
        append.push_str(&format!(" ftlab.witness={}", topo.witness_addr()));
    }
    if topo.alink_plaintext {
        append.push_str(" ftlab.alink_plaintext=1");
    }
    let mgmt = topo.mgmt_addr(node);
    let mut c = Command::new(QEMU);
    c.arg("-name")
        .arg(format!("ftlab-{}-{node}", topo.name))
        .args(["-accel", "tcg", "-cpu", "EPYC,+svm", "-smp", "1"])
        .args(["-m", &topo.node_mem_mib.to_string()])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(&images.node_kernel)
        .arg("-initrd")
        .arg(&images.node_initramfs)
        .args(["-append", &append])
        .arg("-chardev")
        .arg(format!(
            "file,id=console,append=on,path={}",
            topo.console_log(node).display()
        ))
        .args(["-serial", "chardev:console"])
        .arg("-drive")
        .arg(format!(
            "if=none,id=data,format=raw,cache=writeback,file={}",
            topo.disk(node).display()
        ))
        .args(["-device", "virtio-blk-pci,drive=data,serial=data"])
        .arg("-drive")
        .arg(format!(
            "if=none,id=images,format=raw,readonly=on,file={}",
            images.node_images_disk.display()
        ))
        .args(["-device", "virtio-blk-pci,drive=images,serial=images"])
        .arg("-netdev")
        .arg(format!(
            "user,id=mgmt,restrict=on,hostfwd=tcp:{}:{}-10.0.2.15:{AGENT_PORT}",
            mgmt.ip(),
            mgmt.port()
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=mgmt,romfile=,mac={}",
            topo.mac(node, Nic::Mgmt)
        ))
        .arg("-netdev")
        .arg(format!(
            "socket,id=alink,udp=127.0.0.1:{},localaddr=127.0.0.1:{}",
            topo.alink_udp_port(peer),
            topo.alink_udp_port(node)
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=alink,id=alink0,romfile=,mac={}",
            topo.mac(node, Nic::Alink)
        ))
        .arg("-netdev")
        .arg(format!(
            "tap,id=biz,ifname={},script=no,downscript=no",
            topo.tap(node)
        ))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,netdev=biz,id=biz0,romfile=,mac={}",
            topo.mac(node, Nic::Biz)
        ))
        .arg("-qmp")
        .arg(format!(
            "unix:{},server=on,wait=off",
            topo.qmp_socket(node).display()
        ))
        .arg("-pidfile")
        .arg(topo.pid_file(node))
        .arg("-daemonize");
    c
}

/// Starts `node`'s QEMU in the background and returns its pid.
pub fn start(
    topo: &Topology,
    images: &Images,
    node: NodeId,
    secrets: &LabSecrets,
) -> Result<u32, QemuError> {
    let _ = std::fs::remove_file(topo.pid_file(node));
    let _ = std::fs::remove_file(topo.qmp_socket(node));
    let out = command(topo, images, node, secrets)
        .output()
        .map_err(QemuError::Spawn)?;
    if !out.status.success() {
        return Err(QemuError::Start {
            node,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    running_pid(topo, node).ok_or_else(|| QemuError::NoPid {
        node,
        path: topo.pid_file(node),
    })
}

/// The pid of `node`'s QEMU if it is running.
pub fn running_pid(topo: &Topology, node: NodeId) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(topo.pid_file(node))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let ours = format!("ftlab-{}-{node}", topo.name);
    let is_ours = cmdline.split(|&b| b == 0).any(|arg| arg == ours.as_bytes());
    is_ours.then_some(pid)
}

/// Kills `pid` with SIGKILL (a power cut) and waits until it is gone.
pub fn kill(pid: u32) -> Result<(), QemuError> {
    // SAFETY: kill(2) with a pid we read from QEMU's pid file and checked to
    // be a lab QEMU; it has no memory-safety preconditions.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::path::Path::new(&format!("/proc/{pid}")).exists() {
        // A zombie (if we are its parent) counts as gone.
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        {
            break;
        }
        if Instant::now() > deadline {
            return Err(QemuError::Unkillable { pid });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}
