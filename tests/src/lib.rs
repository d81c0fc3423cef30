//! The harness of the end-to-end tests: a lab pair that starts for a test,
//! speaks in the test's terms (exec, send over the A-link, reach a node over
//! the business network, pull a node) and always cleans up, also when the
//! test fails.
//!
//! Lab tests need root, QEMU and the images (the harness builds what is
//! missing). They take a host-wide lock, so only one lab runs at a time: two
//! TCG nodes already fill the two cores of a CI machine.
//!
//! [`browser`] drives a real headless Chromium for the tests of web pages.

pub mod browser;
pub mod guest;

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use lab::agent::{AgentError, EchoReport, ExecOutput};
pub use lab::{Lab, LinkId, NodeId};

const EXEC_TIMEOUT: Duration = Duration::from_secs(120);

/// A lab running for one test; dropped, it stops and removes everything.
pub struct LabPair {
    lab: Lab,
    _lock: LabLock,
}

/// Holds the host-wide lab lock: one lab test at a time.
pub struct LabLock {
    _file: File,
}

impl LabLock {
    /// Blocks until no other lab test runs.
    pub fn acquire() -> LabLock {
        let dir = std::env::var_os("FTLAB_DIR")
            .map_or_else(|| PathBuf::from("/var/tmp/ftlab"), PathBuf::from);
        std::fs::create_dir_all(&dir).expect("create the lab folder");
        let path = dir.join(".e2e.lock");
        let file =
            File::create(&path).unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        // SAFETY: flock on a descriptor we own; it blocks until the lock is free.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(
            rc,
            0,
            "flock {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
        LabLock { _file: file }
    }
}

impl LabPair {
    /// Starts both nodes of lab `name` from a clean state.
    pub fn start(name: &str) -> LabPair {
        Self::start_nodes(name, &NodeId::ALL)
    }

    /// Starts only `nodes` of lab `name` from a clean state.
    pub fn start_nodes(name: &str, nodes: &[NodeId]) -> LabPair {
        Self::start_configured(name, nodes, |_| {})
    }

    /// Starts `nodes` of lab `name` from a clean state, its topology
    /// changed by `configure` first (memory, disk size, A-link protection).
    pub fn start_configured(
        name: &str,
        nodes: &[NodeId],
        configure: impl FnOnce(&mut lab::topology::Topology),
    ) -> LabPair {
        Self::start_locked(name, nodes, configure, false)
    }

    /// Takes the host-wide lab lock, then (`alone`: refusing while another
    /// lab's nodes run) starts `nodes` of lab `name` from a clean state.
    fn start_locked(
        name: &str,
        nodes: &[NodeId],
        configure: impl FnOnce(&mut lab::topology::Topology),
        alone: bool,
    ) -> LabPair {
        let lock = LabLock::acquire();
        let mut lab = Lab::open(name).expect("lab name");
        if alone {
            if let Some((other, node, pid)) = lab.others_running().first() {
                panic!(
                    "lab '{other}' runs on this host (node {node}, QEMU pid {pid}): its nodes \
                     would take the cores this benchmark measures on; stop it first with \
                     `ftctl lab down --lab {other}`"
                );
            }
        }
        configure(&mut lab.topo);
        lab.down().expect("remove what an earlier run left");
        let pair = LabPair { lab, _lock: lock };
        let boots = pair
            .lab
            .up(nodes)
            .unwrap_or_else(|e| panic!("lab up failed: {e}"));
        for b in boots {
            eprintln!("[e2e] node {} booted in {:.1}s", b.node, b.boot_secs);
        }
        pair
    }

    /// Starts both nodes of lab `name` for a benchmark: refuses (panics,
    /// saying which) while another lab runs on this host, whose nodes
    /// would take the cores the figures are measured on.
    pub fn start_alone(name: &str) -> LabPair {
        Self::start_alone_configured(name, &NodeId::ALL, |_| {})
    }

    /// [`LabPair::start_alone`] for `nodes`, the topology changed by
    /// `configure` first.
    pub fn start_alone_configured(
        name: &str,
        nodes: &[NodeId],
        configure: impl FnOnce(&mut lab::topology::Topology),
    ) -> LabPair {
        Self::start_locked(name, nodes, configure, true)
    }

    pub fn lab(&self) -> &Lab {
        &self.lab
    }

    /// A client of the ledger VM (the protected lab VM), retried until the
    /// guest serves it (it starts with the guest) or 180 s pass: the guest
    /// boots under FT, which on a slow TCG lab node took over 90 s. A
    /// failed try is said when its error differs from the last one said,
    /// and at least every 20 s; if the guest never serves, the panic ends
    /// with what each node's engine and the guest's console say (the end
    /// of a long failure is what a CI report keeps).
    pub fn ledger_client(&self) -> guest_tools::ledger::LedgerClient {
        const SAY_AGAIN: Duration = Duration::from_secs(20);
        let addr = lab::ft_pair::ledger_addr(&self.lab);
        let started = Instant::now();
        let deadline = started + Duration::from_secs(180);
        let mut said: Option<(String, Instant)> = None;
        let mut failures = 0u32;
        loop {
            match guest_tools::ledger::LedgerClient::connect(addr, Duration::from_secs(120)) {
                Ok(c) => {
                    if failures > 0 {
                        eprintln!(
                            "[e2e] the ledger serves after {failures} failed tries ({:.1} s)",
                            started.elapsed().as_secs_f64()
                        );
                    }
                    return c;
                }
                Err(e) if Instant::now() < deadline => {
                    failures += 1;
                    let text = e.to_string();
                    if said
                        .as_ref()
                        .is_none_or(|(t, at)| *t != text || at.elapsed() >= SAY_AGAIN)
                    {
                        eprintln!(
                            "[e2e] the ledger at {addr} is not serving yet ({failures} tries in \
                             {:.0} s): {text}",
                            started.elapsed().as_secs_f64()
                        );
                        said = Some((text, Instant::now()));
                    }
                    std::thread::sleep(Duration::from_millis(500))
                }
                Err(e) => panic!(
                    "the ledger at {addr} is not serving after {:.0} s and {failures} tries: {e}\n{}",
                    started.elapsed().as_secs_f64(),
                    self.ledger_unreachable_report()
                ),
            }
        }
    }

    /// Why the ledger may not answer, shortest and most telling last:
    /// each node's daemon and engine log tails, then per node the engine's
    /// state and output counters (held output that never leaves, or a
    /// guest that stopped), the host's neighbour entry for the guest (no
    /// ARP answer: "FAILED"/"INCOMPLETE") and the guest console's last
    /// lines on the node running it (a guest that never reached its init,
    /// or panicked).
    pub fn ledger_unreachable_report(&self) -> String {
        use lab::ft_pair::{guest_console, log_tails, status};
        let mut report = String::new();
        for node in NodeId::ALL {
            report += &format!("--- node {node}:\n{}", log_tails(&self.lab, node, 10, 10));
        }
        let mut console_on = None;
        for node in NodeId::ALL {
            let line = match status(&self.lab, node) {
                Some(s) => {
                    let c = &s.counters;
                    if s.role == replicator::status::Role::Primary {
                        console_on = Some(node);
                    }
                    format!(
                        "{} {} at epoch {} ({}); checkpoints {} (a standby: epochs applied {}), \
                         received frames forwarded {}, output released {} held now {}, behind \
                         pauses {} ({} ms), interval {} us",
                        s.role,
                        s.state.as_str(),
                        s.epoch,
                        s.message.as_deref().unwrap_or("no message"),
                        c.checkpoints,
                        c.epochs_applied,
                        c.inbound_forwarded,
                        c.output_frames_released,
                        c.output_frames_held_now,
                        c.behind_pauses,
                        c.behind_paused_ms,
                        c.interval_us_last
                    )
                }
                None => "no engine status".into(),
            };
            report += &format!("node {node}: {line}\n");
        }
        let guest = lab::ft_pair::ledger_addr(&self.lab).ip();
        let neighbour = std::process::Command::new("ip")
            .args(["neigh", "show", &guest.to_string()])
            .output()
            .map_or_else(
                |e| format!("`ip neigh` failed: {e}"),
                |o| String::from_utf8_lossy(&o.stdout).trim().to_string(),
            );
        report += &format!("host's neighbour entry for {guest}: {neighbour:?}\n");
        let node = console_on.unwrap_or(NodeId::A);
        let console = guest_console(&self.lab, node, 8);
        report + &format!("guest console on node {node} (last lines):\n{console}")
    }

    /// Runs `argv` in `node`.
    pub fn exec(&self, node: NodeId, argv: &[&str]) -> ExecOutput {
        self.lab
            .exec(node, argv, EXEC_TIMEOUT)
            .unwrap_or_else(|e| panic!("exec {argv:?} on node {node}: {e}"))
    }

    /// Runs a shell command in `node`, asserts it succeeded, returns stdout.
    pub fn sh(&self, node: NodeId, script: &str) -> String {
        let out = self.exec(node, &["sh", "-c", script]);
        assert!(
            out.success(),
            "`{script}` on node {node} failed ({}): {}",
            out.exit_code(),
            out.stderr
        );
        out.stdout
    }

    /// From inside `from`, sends `bytes` to `to`'s agent over the A-link and
    /// back, checked on both ends.
    pub fn send_over_alink(
        &self,
        from: NodeId,
        to: NodeId,
        bytes: u64,
        timeout_secs: u64,
    ) -> Result<EchoReport, String> {
        let addr = self.lab.topo.alink_agent_addr(to).to_string();
        let (bytes, timeout) = (bytes.to_string(), timeout_secs.to_string());
        let argv = [
            "lab-agent",
            "send",
            "--to",
            &addr,
            "--bytes",
            &bytes,
            "--timeout-secs",
            &timeout,
        ];
        let out = self.exec(from, &argv);
        if !out.success() {
            return Err(format!("send {from} -> {to} failed: {}", out.stderr.trim()));
        }
        serde_json::from_str(out.stdout.trim())
            .map_err(|e| format!("bad report {:?}: {e}", out.stdout))
    }

    /// From the outer host, sends `bytes` to `node` over the business network.
    pub fn send_over_biz(
        &self,
        node: NodeId,
        bytes: u64,
        timeout: Duration,
    ) -> Result<EchoReport, AgentError> {
        self.lab
            .biz_agent(node)
            .with_connect_timeout(timeout)
            .echo(bytes, 7, timeout)
    }

    pub fn pull(&self, node: NodeId) {
        self.lab
            .pull(node)
            .unwrap_or_else(|e| panic!("pull {node}: {e}"));
    }

    pub fn is_running(&self, node: NodeId) -> bool {
        self.lab.pid(node).is_some()
    }

    pub fn set_link(&self, link: LinkId, up: bool) {
        self.lab
            .set_link(link, up)
            .unwrap_or_else(|e| panic!("set link {link} up={up}: {e}"));
    }

    /// The last lines of `node`'s console log.
    pub fn console_tail(&self, node: NodeId, lines: usize) -> String {
        lab::lab::tail(&self.lab.console_log(node), lines)
    }
}

impl Drop for LabPair {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for node in NodeId::ALL {
                eprintln!(
                    "[e2e] console of node {node}:\n{}",
                    self.console_tail(node, 40)
                );
                // The logs live on the node's disk, which goes with the lab.
                if self.is_running(node) {
                    eprintln!(
                        "[e2e] logs of node {node}:\n{}",
                        lab::ft_pair::log_tails(&self.lab, node, 40, 120)
                    );
                }
            }
        }
        if let Err(e) = self.lab.down() {
            eprintln!("[e2e] lab down failed: {e}");
        }
    }
}

/// A ledger client that appends ids 1, 2, ... and keeps those
/// acknowledged, to check at the end that the ledger lost none.
pub struct Appender {
    client: guest_tools::ledger::LedgerClient,
    /// The ids acknowledged, in order.
    pub acked: Vec<u64>,
    sent: u64,
}

impl Appender {
    pub fn new(client: guest_tools::ledger::LedgerClient) -> Appender {
        Appender {
            client,
            acked: Vec::new(),
            sent: 0,
        }
    }

    /// Appends one id after another for `d`.
    pub fn append_for(&mut self, d: Duration) {
        if let Err(e) = self.try_append_for(d) {
            panic!("append: {e}");
        }
    }

    /// Appends one id after another for `d`; the first failure (an id
    /// the ledger did not acknowledge in time) ends it.
    pub fn try_append_for(&mut self, d: Duration) -> Result<(), String> {
        let until = Instant::now() + d;
        while Instant::now() < until {
            self.try_append()?;
        }
        Ok(())
    }

    /// Appends the next id; fails if the ledger does not acknowledge it in
    /// time.
    pub fn try_append(&mut self) -> Result<(), String> {
        self.sent += 1;
        let asked = Instant::now();
        self.client.append(self.sent).map_err(|e| {
            format!(
                "id {} not acknowledged after {:.1} s: {e}; {}",
                self.sent,
                asked.elapsed().as_secs_f64(),
                self.probe()
            )
        })?;
        self.acked.push(self.sent);
        Ok(())
    }

    /// What a second connection learns of a ledger that did not answer:
    /// whether the guest serves at all (PING takes no lock), and whether
    /// the unanswered id reached the ledger's memory (DUMP waits for the
    /// ledger's lock, which an append stuck on the disk holds).
    fn probe(&self) -> String {
        let Some(addr) = self.client.peer_addr() else {
            return "no address to probe".into();
        };
        let within = Duration::from_secs(5);
        let mut probe = match guest_tools::ledger::LedgerClient::connect(addr, within) {
            Ok(p) => p,
            Err(e) => return format!("a second connection failed: {e}"),
        };
        let ping = match probe.ping() {
            Ok(took) => format!("PING answered in {} ms", took.as_millis()),
            Err(e) => return format!("PING on a second connection failed: {e}"),
        };
        match probe.dump() {
            Ok(ids) => format!(
                "{ping}; the ledger's memory {} id {} ({} ids)",
                if ids.contains(&self.sent) {
                    "holds"
                } else {
                    "lacks"
                },
                self.sent,
                ids.len()
            ),
            Err(e) => format!("{ping}; DUMP failed (the ledger's lock held?): {e}"),
        }
    }

    /// The ledger's memory holds every acknowledged id once.
    pub fn assert_nothing_lost(&mut self) {
        let memory = self.client.dump().expect("dump");
        let verdict = guest_tools::ledger::verify(&self.acked, self.sent, &memory);
        assert!(verdict.ok(), "{verdict:?}");
    }
}

/// `a / b` with two decimals for a benchmark's table ("-" without a
/// denominator).
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}", a / b)
    } else {
        "-".into()
    }
}
