//! A running lab: two nodes, their links and files, and the operations of
//! `ftctl lab` (up, down, status, exec, pull, cut, heal).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::agent::{AgentClient, AgentError, ExecOutput};
use crate::host_net::{self, HostNetError};
use crate::images::{self, ImagesError};
use crate::qemu::{self, QemuError};
use crate::qmp::{Qmp, QmpError};
use crate::topology::{LinkId, NodeId, Topology};

/// How long a node may take from QEMU start to its agent answering.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("{0}")]
    Topology(String),
    #[error(transparent)]
    Images(#[from] ImagesError),
    #[error(transparent)]
    HostNet(#[from] HostNetError),
    #[error(transparent)]
    Qemu(#[from] QemuError),
    #[error("cannot {action} link {link} on node {node}: {source}")]
    Qmp {
        action: &'static str,
        link: LinkId,
        node: NodeId,
        #[source]
        source: QmpError,
    },
    #[error(transparent)]
    Agent(#[from] AgentError),
    #[error(transparent)]
    Witness(#[from] crate::witness::WitnessError),
    #[error("lab file {path}: {source}")]
    File {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("lab state {path} is corrupt ({source}); `ftctl lab down` resets it")]
    StateCorrupt {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot create the disk of node {node}: {stderr}")]
    Disk { node: NodeId, stderr: String },
    #[error("node {node} is not running (start it with `ftctl lab up --node {node}`)")]
    NotRunning { node: NodeId },
    #[error("node {node} did not answer within {}s; console {}:\n{tail}", BOOT_TIMEOUT.as_secs(), console.display())]
    BootTimeout {
        node: NodeId,
        console: PathBuf,
        tail: String,
    },
    #[error("node {node} died while booting; console {}:\n{tail}", console.display())]
    DiedBooting {
        node: NodeId,
        console: PathBuf,
        tail: String,
    },
}

/// What persists between `ftctl` calls besides the QEMU processes.
#[derive(Debug, Default, Serialize, Deserialize)]
struct LabState {
    /// Links that were cut (re-applied to a node that restarts).
    cut: BTreeSet<LinkId>,
}

/// How a node's start went.
#[derive(Debug, Clone, Serialize)]
pub struct NodeBoot {
    pub node: NodeId,
    pub pid: u32,
    /// From starting QEMU to the agent's first answer.
    pub boot_secs: f64,
    /// The node kernel's uptime at the agent's first answer.
    pub kernel_uptime_secs: f64,
    /// Whether the node was already running (then the times are zero).
    pub already_running: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub pid: Option<u32>,
    pub agent: Option<String>,
    pub console: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct LabStatus {
    pub name: String,
    pub dir: PathBuf,
    pub nodes: Vec<NodeStatus>,
    pub links: Vec<(LinkId, bool)>,
}

/// A lab on this host, running or not.
#[derive(Debug, Clone)]
pub struct Lab {
    pub topo: Topology,
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> LabError + '_ {
    move |source| LabError::File {
        path: path.to_path_buf(),
        source,
    }
}

/// The last `lines` lines of a file (for error messages).
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let text = String::from_utf8_lossy(&text);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A progress line on stderr.
pub fn progress(msg: impl std::fmt::Display) {
    eprintln!("[ftlab] {msg}");
}

/// The lab pair's secret and API token (made once per lab).
#[derive(Debug, Clone)]
pub struct LabSecrets {
    pub pair_secret: String,
    pub api_token: String,
}

/// 32 random bytes from the kernel, as hex.
fn random_hex() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Reads a lab secret file, making it (mode 0600) when missing.
fn secret_file(path: &Path) -> Result<String, LabError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::read_to_string(path) {
        Ok(s) if !s.trim().is_empty() => return Ok(s.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(file_err(path)(e)),
    }
    let value = random_hex().map_err(file_err(path))?;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(file_err(path))?;
    f.write_all(value.as_bytes()).map_err(file_err(path))?;
    Ok(value)
}

impl Lab {
    /// The lab's pair secret and API token (made at the first `up`).
    pub fn secrets(&self) -> Result<LabSecrets, LabError> {
        std::fs::create_dir_all(&self.topo.dir).map_err(file_err(&self.topo.dir))?;
        Ok(LabSecrets {
            pair_secret: secret_file(&self.topo.pair_secret_file())?,
            api_token: secret_file(&self.topo.api_token_file())?,
        })
    }

    pub fn open(name: &str) -> Result<Lab, LabError> {
        Ok(Lab {
            topo: Topology::new(name).map_err(LabError::Topology)?,
        })
    }

    fn load_state(&self) -> Result<LabState, LabError> {
        let path = self.topo.state_file();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|source| LabError::StateCorrupt { path, source }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(LabState::default()),
            Err(e) => Err(file_err(&path)(e)),
        }
    }

    fn save_state(&self, state: &LabState) -> Result<(), LabError> {
        let path = self.topo.state_file();
        let tmp = path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).expect("state serialises");
        std::fs::write(&tmp, bytes).map_err(file_err(&tmp))?;
        std::fs::rename(&tmp, &path).map_err(file_err(&path))
    }

    pub fn pid(&self, node: NodeId) -> Option<u32> {
        qemu::running_pid(&self.topo, node)
    }

    /// The nodes of other labs running on this host (lab, node, QEMU pid):
    /// two TCG nodes fill two cores, so a lab beside another runs slower
    /// and its timings say little.
    pub fn others_running(&self) -> Vec<(String, NodeId, u32)> {
        let Some(root) = self.topo.dir.parent() else {
            return Vec::new();
        };
        let Ok(entries) = std::fs::read_dir(root) else {
            return Vec::new();
        };
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|name| *name != self.topo.name)
            .collect();
        names.sort();
        names
            .into_iter()
            .filter_map(|name| {
                let mut topo = Topology::new(&name).ok()?;
                topo.dir = root.join(&name);
                Some(topo)
            })
            .flat_map(|topo| {
                NodeId::ALL
                    .into_iter()
                    .filter_map(|node| {
                        Some((topo.name.clone(), node, qemu::running_pid(&topo, node)?))
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The node's agent over its management NIC (independent of lab links).
    pub fn agent(&self, node: NodeId) -> AgentClient {
        AgentClient::new(self.topo.mgmt_addr(node))
    }

    /// The node's agent over the business network.
    pub fn biz_agent(&self, node: NodeId) -> AgentClient {
        AgentClient::new(self.topo.biz_agent_addr(node))
    }

    pub fn console_log(&self, node: NodeId) -> PathBuf {
        self.topo.console_log(node)
    }

    /// Where the images a node booted from are noted (a running node keeps
    /// the binaries it booted with).
    fn booted_images(&self, node: NodeId) -> PathBuf {
        self.topo.dir.join(format!("node-{node}.images"))
    }

    /// Starts the given nodes (those not running yet), building images and
    /// setting up the host side of the networks first.
    pub fn up(&self, nodes: &[NodeId]) -> Result<Vec<NodeBoot>, LabError> {
        host_net::require_root()?;
        for (other, node, pid) in self.others_running() {
            progress(format_args!(
                "warning: lab '{other}' runs beside this one (node {node}, QEMU pid {pid}): both \
                 share this host's cores, so both run slower (`ftctl lab down --lab {other}` \
                 stops it)"
            ));
        }
        std::fs::create_dir_all(&self.topo.dir).map_err(file_err(&self.topo.dir))?;
        let state = self.load_state()?;
        let (images, took) = images::build_once()?;
        images.check()?;
        match took {
            Some(took) => progress(format_args!("images ready ({:.1}s)", took.as_secs_f64())),
            None => progress("images ready (built earlier by this process)"),
        }
        let secrets = self.secrets()?;
        let bridge = self.topo.bridge();
        host_net::ensure_bridge(&bridge, &format!("{}/24", self.topo.host_biz_ip()))?;
        if self.topo.witness {
            let witness = crate::witness::start(&self.topo, &images.static_bin_dir)?;
            progress(format_args!(
                "witness on {} (pid {witness}, log {})",
                self.topo.witness_addr(),
                self.topo.witness_log().display()
            ));
        } else {
            progress("no witness: the nodes decide takeovers by silence alone");
        }

        let mut boots = Vec::new();
        let mut starting = Vec::new();
        for &node in nodes {
            if let Some(pid) = self.pid(node) {
                progress(format_args!("node {node} is already running (pid {pid})"));
                let booted = std::fs::read_to_string(self.booted_images(node)).ok();
                let current = images.node_images_disk.display().to_string();
                if booted.as_deref().map(str::trim) != Some(current.as_str()) {
                    progress(format_args!(
                        "node {node} runs the binaries of another build ({}); \
                         `ftctl lab down` first to run this one",
                        booted.as_deref().map_or("unknown", str::trim)
                    ));
                }
                boots.push(NodeBoot {
                    node,
                    pid,
                    boot_secs: 0.0,
                    kernel_uptime_secs: 0.0,
                    already_running: true,
                });
                continue;
            }
            host_net::ensure_tap(&self.topo.tap(node), &bridge)?;
            self.ensure_disk(node)?;
            let pid = qemu::start(&self.topo, &images, node, &secrets)?;
            let booted = self.booted_images(node);
            std::fs::write(&booted, images.node_images_disk.display().to_string())
                .map_err(file_err(&booted))?;
            progress(format_args!(
                "node {node} starting (pid {pid}, console {})",
                self.console_log(node).display()
            ));
            starting.push((node, pid, Instant::now()));
        }
        for (node, pid, started) in starting {
            let uptime = self.wait_for_agent(node, started)?;
            let boot = NodeBoot {
                node,
                pid,
                boot_secs: started.elapsed().as_secs_f64(),
                kernel_uptime_secs: uptime.as_secs_f64(),
                already_running: false,
            };
            progress(format_args!(
                "node {node} up in {:.1}s (kernel uptime {:.1}s at first answer)",
                boot.boot_secs, boot.kernel_uptime_secs
            ));
            for &link in &state.cut {
                self.set_node_link(node, link, false)?;
            }
            boots.push(boot);
        }
        Ok(boots)
    }

    fn ensure_disk(&self, node: NodeId) -> Result<(), LabError> {
        let path = self.topo.disk(node);
        if path.exists() {
            return Ok(());
        }
        let out = Command::new("mke2fs")
            .args(["-q", "-t", "ext4", "-L", &format!("node-{node}"), "-F"])
            .arg(&path)
            .arg(format!("{}M", self.topo.disk_size_mib))
            .output()
            .map_err(file_err(&path))?;
        if !out.status.success() {
            let _ = std::fs::remove_file(&path);
            return Err(LabError::Disk {
                node,
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    fn wait_for_agent(&self, node: NodeId, started: Instant) -> Result<Duration, LabError> {
        let client = self
            .agent(node)
            .with_connect_timeout(Duration::from_secs(1));
        loop {
            match client.ping() {
                Ok((_, uptime)) => return Ok(uptime),
                Err(_) if self.pid(node).is_none() => {
                    return Err(LabError::DiedBooting {
                        node,
                        console: self.console_log(node),
                        tail: tail(&self.console_log(node), 30),
                    })
                }
                Err(_) if started.elapsed() > BOOT_TIMEOUT => {
                    return Err(LabError::BootTimeout {
                        node,
                        console: self.console_log(node),
                        tail: tail(&self.console_log(node), 30),
                    })
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// Stops every node and removes the lab's network devices and files.
    pub fn down(&self) -> Result<(), LabError> {
        if crate::witness::stop(&self.topo) {
            progress("witness stopped");
        }
        for node in NodeId::ALL {
            if let Some(pid) = self.pid(node) {
                qemu::kill(pid)?;
                progress(format_args!("node {node} stopped"));
            }
            host_net::delete_link(&self.topo.tap(node))?;
        }
        host_net::delete_link(&self.topo.bridge())?;
        if self.topo.dir.exists() {
            std::fs::remove_dir_all(&self.topo.dir).map_err(file_err(&self.topo.dir))?;
        }
        Ok(())
    }

    /// Starts the lab's witness (on the host) unless it runs; its pid.
    pub fn start_witness(&self) -> Result<u32, LabError> {
        host_net::require_root()?;
        let (images, _) = images::build_once()?;
        Ok(crate::witness::start(&self.topo, &images.static_bin_dir)?)
    }

    /// Stops the lab's witness; true if it ran.
    pub fn stop_witness(&self) -> bool {
        crate::witness::stop(&self.topo)
    }

    pub fn status(&self) -> Result<LabStatus, LabError> {
        let state = self.load_state()?;
        let nodes = NodeId::ALL
            .iter()
            .map(|&node| {
                let pid = self.pid(node);
                let agent = pid.and_then(|_| {
                    let (host, uptime) = self.agent(node).ping().ok()?;
                    Some(format!("{host}, up {:.0}s", uptime.as_secs_f64()))
                });
                NodeStatus {
                    node,
                    pid,
                    agent,
                    console: self.console_log(node),
                }
            })
            .collect();
        let links = LinkId::ALL
            .iter()
            .map(|&l| (l, !state.cut.contains(&l)))
            .collect();
        Ok(LabStatus {
            name: self.topo.name.clone(),
            dir: self.topo.dir.clone(),
            nodes,
            links,
        })
    }

    /// Runs `argv` inside `node` through its agent.
    pub fn exec<S: AsRef<str>>(
        &self,
        node: NodeId,
        argv: &[S],
        timeout: Duration,
    ) -> Result<ExecOutput, LabError> {
        if self.pid(node).is_none() {
            return Err(LabError::NotRunning { node });
        }
        Ok(self.agent(node).exec(argv, timeout)?)
    }

    /// Power-cuts `node`: its QEMU is killed with SIGKILL.
    pub fn pull(&self, node: NodeId) -> Result<(), LabError> {
        let pid = self.pid(node).ok_or(LabError::NotRunning { node })?;
        qemu::kill(pid)?;
        Ok(())
    }

    /// Cuts (`up == false`) or heals `link` on every running node.
    pub fn set_link(&self, link: LinkId, up: bool) -> Result<(), LabError> {
        let mut state = self.load_state()?;
        for node in NodeId::ALL {
            if self.pid(node).is_some() {
                self.set_node_link(node, link, up)?;
            }
        }
        if up {
            state.cut.remove(&link);
        } else {
            state.cut.insert(link);
        }
        self.save_state(&state)
    }

    /// Cuts or heals `link` on `node` only (not remembered across that
    /// node's reboot).
    pub fn set_node_link(&self, node: NodeId, link: LinkId, up: bool) -> Result<(), LabError> {
        let action = if up { "heal" } else { "cut" };
        let qmp_err = |source| LabError::Qmp {
            action,
            link,
            node,
            source,
        };
        let mut qmp = Qmp::connect(&self.topo.qmp_socket(node)).map_err(qmp_err)?;
        qmp.set_link(link.device_id(), up).map_err(qmp_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose command line names it node `node` of lab `name`,
    /// as a lab's QEMU's does (`-name ftlab-<lab>-<node>`).
    fn fake_node(name: &str, node: NodeId) -> std::process::Child {
        // It waits on its stdin (a pipe) until killed: nothing outlives it.
        std::process::Command::new("sh")
            .args(["-c", "read line", &format!("ftlab-{name}-{node}")])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("spawn sh")
    }

    #[test]
    fn other_labs_running_are_found_and_stopped_ones_are_not() {
        let root = std::env::temp_dir().join(format!("ftlab-others-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let open = |name: &str| {
            let mut lab = Lab::open(name).expect("lab name");
            lab.topo.dir = root.join(name);
            std::fs::create_dir_all(&lab.topo.dir).expect("lab folder");
            lab
        };
        let mine = open("mine");
        let other = open("other");
        let stale = open("stale");
        std::fs::create_dir_all(root.join("Not A Lab")).expect("folder");
        // Node b of "other" runs; "stale"'s pid file names a process that
        // is not its node (this test's own).
        let mut running = fake_node("other", NodeId::B);
        std::fs::write(other.topo.pid_file(NodeId::B), running.id().to_string()).expect("pid");
        std::fs::write(
            stale.topo.pid_file(NodeId::A),
            std::process::id().to_string(),
        )
        .expect("pid");
        // This lab's own nodes do not count.
        let mut own = fake_node("mine", NodeId::A);
        std::fs::write(mine.topo.pid_file(NodeId::A), own.id().to_string()).expect("pid");

        let found = mine.others_running();
        let _ = running.kill();
        let _ = own.kill();
        let _ = running.wait();
        let _ = own.wait();
        assert_eq!(found, vec![("other".to_string(), NodeId::B, running.id())]);
        assert!(
            mine.others_running().is_empty(),
            "a node that ended still counted"
        );
        let _ = std::fs::remove_dir_all(&root);
    }
}
