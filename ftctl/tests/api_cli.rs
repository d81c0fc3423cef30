//! `ftctl` as the API's client, end to end: the real `ftd` daemon on a
//! loopback port (its state in a temporary directory) and the real
//! `ftctl` binary run against it, its tables, JSON, messages and exit
//! codes checked.
//!
//! `ftd` is another crate's binary: it is taken from the target directory
//! this test runs from (`target/<profile>/ftd`), built with
//! `cargo build -p ftd` when it is missing there.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `ftd` binary next to this test's target directory.
fn ftd_binary() -> &'static Path {
    static FTD: OnceLock<PathBuf> = OnceLock::new();
    FTD.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test binary's path");
        // target/<profile>/deps/api_cli-<hash>
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("the test binary is in target/<profile>/deps");
        let ftd = profile_dir.join("ftd");
        if !ftd.exists() {
            let mut cargo = Command::new(env!("CARGO"));
            cargo.args(["build", "-p", "ftd"]);
            if let Some(target_dir) = profile_dir.parent() {
                cargo.arg("--target-dir").arg(target_dir);
            }
            if profile_dir.file_name().is_some_and(|n| n == "release") {
                cargo.arg("--release");
            }
            let status = cargo.status().expect("cargo runs");
            assert!(status.success(), "cargo build -p ftd failed");
            assert!(
                ftd.exists(),
                "no {} after cargo build -p ftd",
                ftd.display()
            );
        }
        ftd
    })
}

/// A port free a moment ago, never the same one twice in this test process
/// (the kernel may hand a port let go back out at once: a daemon and a
/// "closed" port of two tests running together must not share one).
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

/// A port nothing listens on (bound, then let go).
fn closed_port() -> u16 {
    free_port()
}

/// An `ftd` serving its API on a loopback port.
struct Daemon {
    dir: tempfile::TempDir,
    child: Option<Child>,
    url: String,
}

impl Daemon {
    fn init() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let out = Command::new(ftd_binary())
            .arg("--state-dir")
            .arg(dir.path())
            .args(["init", "--node", "node-a", "--api"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--alink", "127.0.0.1:17800"])
            // No VM role can run here: a start fails visibly, in the events.
            .args(["--ftprotect", "/nonexistent/ftprotect"])
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ftd init: {out:?}");
        let mut d = Daemon {
            dir,
            child: None,
            url: format!("http://127.0.0.1:{port}"),
        };
        d.start();
        d
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("ftd.log"))
            .unwrap();
        let child = Command::new(ftd_binary())
            .arg("--state-dir")
            .arg(self.dir.path())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(2)))
            .build()
            .into();
        let start = Instant::now();
        loop {
            if let Ok(r) = agent.get(format!("{}/api/health", self.url)).call() {
                if r.status() == 200 {
                    return;
                }
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "ftd did not answer; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ftd.log")).unwrap_or_default()
    }

    fn token_file(&self) -> PathBuf {
        self.dir.path().join("api-token")
    }

    /// A file that stands for a kernel (nothing boots here).
    fn kernel(&self) -> String {
        let path = self.dir.path().join("vmlinux");
        if !path.exists() {
            std::fs::write(&path, b"not a kernel").unwrap();
        }
        path.to_string_lossy().into_owned()
    }

    /// `ftctl` told where the API is by FTCTL_API and FTCTL_TOKEN_FILE.
    fn ftctl_command(&self, args: &[&str]) -> Command {
        let mut c = ftctl_command(args);
        c.env("FTCTL_API", &self.url)
            .env("FTCTL_TOKEN_FILE", self.token_file());
        c
    }

    fn ftctl(&self, args: &[&str]) -> Run {
        Run::of(self.ftctl_command(args).output().unwrap(), args)
    }

    /// Runs `ftctl`, which must succeed.
    fn ok(&self, args: &[&str]) -> Run {
        let run = self.ftctl(args);
        assert_eq!(
            run.code,
            0,
            "ftctl {args:?}: {run:?}; ftd log: {}",
            self.log()
        );
        run
    }

    /// Runs `ftctl ... --json`, which must succeed, and reads its JSON.
    fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let run = self.ok(&args);
        serde_json::from_str(&run.stdout)
            .unwrap_or_else(|e| panic!("ftctl {args:?} printed no JSON ({e}): {run:?}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `ftctl` with no API settings from the environment running the tests.
fn ftctl_command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_ftctl"));
    c.args(args)
        .env_remove("FTCTL_API")
        .env_remove("FTCTL_TOKEN_FILE")
        .stdin(Stdio::null());
    c
}

/// What a run of `ftctl` did.
#[derive(Debug)]
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn of(out: Output, args: &[&str]) -> Run {
        Run {
            code: out
                .status
                .code()
                .unwrap_or_else(|| panic!("ftctl {args:?} was killed: {out:?}")),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The table printed: its lines split into columns.
    fn table(&self) -> Vec<Vec<String>> {
        self.stdout
            .lines()
            .map(|l| l.split_whitespace().map(String::from).collect())
            .collect()
    }
}

#[test]
fn a_vm_is_created_listed_started_stopped_and_deleted() {
    let d = Daemon::init();
    let kernel = d.kernel();
    let created = d.ok(&[
        "vm",
        "create",
        "ledger-vm",
        "--kernel",
        &kernel,
        "--vcpus",
        "2",
        "--memory-mib",
        "64",
        "--cmdline",
        "console=ttyS0 quiet",
        "--disk",
        "size=16",
        "--nic",
        "mac=52:54:00:F7:00:64",
        "--nic",
        "auto",
        "--level",
        "unprotected",
        "--preferred-node",
        "node-a",
    ]);
    assert!(
        created.stdout.contains("VM ledger-vm defined"),
        "{created:?}"
    );

    let list = d.ok(&["vm", "list"]);
    assert_eq!(
        list.table(),
        [
            vec!["NAME", "STATE", "LEVEL", "PRIMARY", "STANDBY", "GENERATION"],
            vec!["ledger-vm", "stopped", "unprotected", "-", "-", "0"],
        ],
        "{list:?}"
    );

    let vm = d.json(&["vm", "show", "ledger-vm"]);
    assert_eq!(vm["name"], "ledger-vm");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["desired"], "stopped");
    assert_eq!(vm["level"], "unprotected");
    assert_eq!(vm["primary_node"], Value::Null);
    assert_eq!(vm["standby_node"], Value::Null);
    let def = &vm["definition"];
    assert_eq!(def["vcpus"], 2);
    assert_eq!(def["memory_mib"], 64);
    assert_eq!(def["kernel"], kernel.as_str());
    assert_eq!(def["cmdline"], "console=ttyS0 quiet");
    assert_eq!(def["disks"][0]["size_mib"], 16);
    assert_eq!(def["nics"][0], "52:54:00:f7:00:64");
    assert_eq!(def["nics"].as_array().map(Vec::len), Some(2));
    assert_eq!(def["preferred_node"], "node-a");

    // The table of `vm show` says the same for people.
    let shown = d.ok(&["vm", "show", "ledger-vm"]);
    for wanted in [
        "state:",
        "stopped",
        "memory:",
        "64 MiB",
        "52:54:00:f7:00:64",
    ] {
        assert!(shown.stdout.contains(wanted), "{wanted}: {shown:?}");
    }

    let started = d.ok(&["vm", "start", "ledger-vm"]);
    assert!(
        started.stdout.contains("on node-a (generation 1)"),
        "{started:?}"
    );
    let vm = d.json(&["vm", "show", "ledger-vm"]);
    assert_eq!(vm["desired"], "running");
    assert_eq!(vm["primary_node"], "node-a");
    assert_eq!(vm["generation"], 1);

    // Running: the node lists it; deleting it is refused.
    let nodes = d.ok(&["node", "list"]);
    assert_eq!(
        nodes.table()[1],
        ["node-a", "up", "yes", "off", "ledger-vm", "-"],
        "{nodes:?}"
    );
    let refused = d.ftctl(&["vm", "delete", "ledger-vm"]);
    assert_eq!(refused.code, 1, "{refused:?}");
    assert!(
        refused.stderr.contains("is running; stop it first"),
        "{refused:?}"
    );

    let stopped = d.json(&["vm", "stop", "ledger-vm"]);
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["desired"], "stopped");
    assert_eq!(stopped["primary_node"], Value::Null);

    let deleted = d.ok(&["vm", "delete", "ledger-vm"]);
    assert_eq!(deleted.stdout, "VM ledger-vm deleted\n");
    let list = d.ok(&["vm", "list"]);
    assert_eq!(
        list.table(),
        [vec![
            "NAME",
            "STATE",
            "LEVEL",
            "PRIMARY",
            "STANDBY",
            "GENERATION"
        ]],
        "{list:?}"
    );
    assert_eq!(d.json(&["vm", "list"]), Value::Array(vec![]));
}

#[test]
fn a_vm_is_created_from_a_json_body() {
    let d = Daemon::init();
    let body = d.dir.path().join("vm.json");
    std::fs::write(
        &body,
        serde_json::json!({"kernel": d.kernel(), "level": "unprotected", "memory_mib": 96})
            .to_string(),
    )
    .unwrap();
    let body = body.to_string_lossy().into_owned();
    let vm = d.json(&["vm", "create", "from-file", "--from-json", &body]);
    assert_eq!(vm["name"], "from-file");
    assert_eq!(vm["definition"]["memory_mib"], 96);
    assert_eq!(vm["level"], "unprotected");

    // A name that differs from the body's is a usage error.
    std::fs::write(&body, r#"{"name": "other", "kernel": "/x"}"#).unwrap();
    let run = d.ftctl(&["vm", "create", "from-file", "--from-json", &body]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("differs"), "{run:?}");
    // The options and a body do not mix.
    let run = d.ftctl(&["vm", "create", "x", "--from-json", &body, "--vcpus", "2"]);
    assert_eq!(run.code, 2, "{run:?}");
}

#[test]
fn api_refusals_exit_1_with_the_api_message() {
    let d = Daemon::init();
    let run = d.ftctl(&["vm", "show", "nope"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stdout, "");
    assert_eq!(run.stderr, "ftctl: error: no VM is named \"nope\"\n");

    // An invalid field is named.
    let run = d.ftctl(&["vm", "create", "bad-kernel", "--kernel", "relative/vmlinux"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.starts_with("ftctl: error: kernel: ")
            && run.stderr.contains("is not an absolute path")
            && run.stderr.trim_end().ends_with("(field: kernel)"),
        "{run:?}"
    );
    // Nothing was defined.
    assert_eq!(d.json(&["vm", "list"]), Value::Array(vec![]));

    // A wrong token is the API's 401, said as such.
    let wrong = d.dir.path().join("wrong-token");
    std::fs::write(&wrong, "not-the-token\n").unwrap();
    let run = Run::of(
        ftctl_command(&["vm", "list", "--api", &d.url, "--token-file"])
            .arg(&wrong)
            .output()
            .unwrap(),
        &["vm", "list"],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("the bearer token is not this node's"),
        "{run:?}"
    );

    // A switchover of a VM that is not running is refused with the
    // API's reason (ftctl looks the VM up first: an unknown one is a 404).
    let run = d.ftctl(&["vm", "switchover", "nope"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert_eq!(run.stderr, "ftctl: error: no VM is named \"nope\"\n");
    let kernel = d.kernel();
    d.ok(&["vm", "create", "idle", "--kernel", &kernel]);
    let run = d.ftctl(&["vm", "switchover", "idle"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("is not running"), "{run:?}");
    d.ok(&["vm", "delete", "idle"]);

    // Maintenance of a node without a peer (its VMs would have nowhere to
    // go), of an unknown node, and the end of one never begun: refused with
    // the API's reason.
    let run = d.ftctl(&["node", "maintenance", "enter", "node-a"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .contains("node node-a has no peer: its VMs have nowhere to go"),
        "{run:?}"
    );
    let run = d.ftctl(&["node", "maintenance", "enter", "node-x"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("no node is named \"node-x\""),
        "{run:?}"
    );
    let run = d.ftctl(&["node", "maintenance", "exit", "node-a", "--no-wait"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr.contains("node node-a is not in maintenance"),
        "{run:?}"
    );
    let shown = d.ok(&["node", "show", "node-a"]);
    assert!(shown.stdout.contains("maintenance"), "{shown:?}");

    // Console users: the password from standard input; a short one is
    // refused with the API's reason.
    let set = |args: &[&str], password: &str| {
        use std::io::Write;
        let mut child = d
            .ftctl_command(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
        Run::of(child.wait_with_output().unwrap(), args)
    };
    let run = set(
        &["user", "set", "alice", "--password-stdin"],
        "correct horse battery",
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "console user alice set\n");
    let run = set(&["user", "set", "bob", "--password-stdin"], "short");
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("password"), "{run:?}");
    assert_eq!(d.ok(&["user", "list"]).stdout, "alice\n");
    d.ok(&["user", "delete", "alice"]);
    let run = d.ftctl(&["user", "delete", "alice"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("no user is named"), "{run:?}");

    // A bad usage is clap's exit 2.
    let run = d.ftctl(&["vm", "create", "no-kernel"]);
    assert_eq!(run.code, 2, "{run:?}");
    let run = d.ftctl(&["vm", "create", "x", "--kernel", "/k", "--disk", "big"]);
    assert_eq!(run.code, 2, "{run:?}");
    assert!(run.stderr.contains("size=MIB or image=PATH"), "{run:?}");
}

#[test]
fn without_an_api_address_ftctl_says_how_to_set_it() {
    let run = Run::of(ftctl_command(&["vm", "list"]).output().unwrap(), &[]);
    assert_ne!(run.code, 0, "{run:?}");
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("set FTCTL_API / --api"), "{run:?}");
    assert!(run.stderr.contains("ftctl lab env"), "{run:?}");

    // An address but no token.
    let run = Run::of(
        ftctl_command(&["vm", "list", "--api", "127.0.0.1:9"])
            .output()
            .unwrap(),
        &[],
    );
    assert_ne!(run.code, 0, "{run:?}");
    assert!(
        run.stderr.contains("set FTCTL_TOKEN_FILE / --token-file"),
        "{run:?}"
    );
}

#[test]
fn an_unreachable_api_is_said_to_be_unreachable() {
    let token = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(token.path(), "some-token\n").unwrap();
    let port = closed_port();
    let api = format!("http://127.0.0.1:{port}");
    let run = Run::of(
        ftctl_command(&["node", "list"])
            .env("FTCTL_API", &api)
            .env("FTCTL_TOKEN_FILE", token.path())
            .output()
            .unwrap(),
        &[],
    );
    assert_eq!(run.code, 1, "{run:?}");
    assert!(
        run.stderr
            .starts_with(&format!("ftctl: error: cannot reach the API at {api}: ")),
        "{run:?}"
    );
}

#[test]
fn nodes_events_and_the_audit_log_are_shown() {
    let d = Daemon::init();
    // The options instead of the environment.
    let token = d.token_file().to_string_lossy().into_owned();
    let run = Run::of(
        ftctl_command(&["node", "list", "--api", &d.url, "--token-file", &token])
            .output()
            .unwrap(),
        &[],
    );
    assert_eq!(run.code, 0, "{run:?}");
    assert_eq!(
        run.table(),
        [
            vec![
                "NAME",
                "STATE",
                "LOCAL",
                "MAINTENANCE",
                "PRIMARIES",
                "STANDBYS"
            ],
            vec!["node-a", "up", "yes", "off", "-", "-"],
        ],
        "{run:?}"
    );
    let node = d.json(&["node", "show", "node-a"]);
    assert_eq!(node["name"], "node-a");
    assert_eq!(node["local"], true);
    let run = d.ftctl(&["node", "show", "node-z"]);
    assert_eq!(run.code, 1, "{run:?}");

    d.ok(&["vm", "create", "ledger-vm", "--kernel", &d.kernel()]);
    let events = d.ok(&["events", "--vm", "ledger-vm"]);
    let table = events.table();
    assert_eq!(
        table[0],
        ["TIME", "NODE", "SEVERITY", "ALERT", "VM", "MESSAGE"],
        "{events:?}"
    );
    let defined = table
        .iter()
        .find(|row| row.iter().any(|cell| cell == "defined"))
        .unwrap_or_else(|| panic!("no defined event: {events:?}"));
    assert_eq!(defined[1..5], ["node-a", "info", "no", "ledger-vm"]);
    // The time is UTC, from unix_ms.
    assert!(
        defined[0].len() == 20 && defined[0].ends_with('Z') && defined[0].as_bytes()[10] == b'T',
        "{defined:?}"
    );
    let json = d.json(&["events", "--vm", "ledger-vm", "--limit", "1"]);
    let list = json.as_array().unwrap();
    assert_eq!(list.len(), 1, "{json}");
    assert!(list[0]["message"].as_str().unwrap().contains("defined"));
    // No alert yet.
    assert_eq!(d.json(&["events", "--alerts"]), Value::Array(vec![]));

    let audit = d.ok(&["audit"]);
    let table = audit.table();
    assert_eq!(
        table[0],
        ["TIME", "NODE", "WHO", "ACTION", "STATUS", "RESULT"],
        "{audit:?}"
    );
    assert!(
        table
            .iter()
            .any(|row| row[3..] == ["POST", "/api/vms", "201", "ok"]),
        "{audit:?}"
    );
    let bad = d.ftctl(&["audit", "--limit", "0"]);
    assert_eq!(bad.code, 1, "{bad:?}");
    assert!(bad.stderr.contains("limit 0 is not in 1..=1000"), "{bad:?}");
}

/// A child process killed when dropped (a failed test leaves no
/// `events --follow` running).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Lines `child` prints, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Waits for a JSON line of `events --follow --json` about `vm`.
fn wait_for_event(lines: &mpsc::Receiver<String>, vm: &str, wanted: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|e| panic!("no event {wanted:?} for {vm} ({e}); seen {seen:?}"));
        let event: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        if event["vm"] == vm && event["message"].as_str().unwrap_or("").contains(wanted) {
            return event;
        }
        seen.push(line);
    }
}

#[test]
fn events_are_followed_across_a_restart_of_the_daemon() {
    let mut d = Daemon::init();
    let kernel = d.kernel();
    d.ok(&["vm", "create", "before", "--kernel", &kernel]);
    let mut follow = Killed(
        d.ftctl_command(&["events", "--follow", "--json"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let lines = lines_of(&mut follow.0);
    // The backlog first, then what happens.
    let before = wait_for_event(&lines, "before", "defined");
    d.ok(&["vm", "create", "streamed", "--kernel", &kernel]);
    let streamed = wait_for_event(&lines, "streamed", "defined");
    assert!(streamed["id"].as_u64() > before["id"].as_u64());

    // The daemon goes away and comes back: ftctl reconnects and prints
    // what happened meanwhile, once.
    d.stop();
    d.start();
    d.ok(&["vm", "create", "after-restart", "--kernel", &kernel]);
    let after = wait_for_event(&lines, "after-restart", "defined");
    assert!(after["id"].as_u64() > streamed["id"].as_u64());
    drop(follow);
    let rest: Vec<String> = lines.try_iter().collect();
    assert!(
        rest.iter().all(|l| !l.contains("\"after-restart\"")),
        "printed twice: {rest:?}"
    );
}

/// With the pair's two addresses, a node that cannot be reached is passed
/// over, for reads and for changes (a refused connection never reached
/// the daemon, so the change cannot happen twice).
#[test]
fn a_node_that_cannot_be_reached_is_passed_over_for_the_other() {
    let d = Daemon::init();
    let kernel = d.kernel();
    let both = format!("http://127.0.0.1:{},{}", closed_port(), d.url);
    let with_both = |args: &[&str]| {
        let mut c = ftctl_command(args);
        c.env("FTCTL_API", &both)
            .env("FTCTL_TOKEN_FILE", d.token_file());
        Run::of(c.output().unwrap(), args)
    };
    let created = with_both(&[
        "vm",
        "create",
        "spare",
        "--kernel",
        &kernel,
        "--level",
        "unprotected",
    ]);
    assert_eq!(created.code, 0, "{created:?}");
    let listed = with_both(&["vm", "list"]);
    assert_eq!(listed.code, 0, "{listed:?}");
    assert!(listed.stdout.contains("spare"), "{listed:?}");
    // Only unreachable addresses: said so, exit 1.
    let dead = format!(
        "http://127.0.0.1:{},http://127.0.0.1:{}",
        closed_port(),
        closed_port()
    );
    let mut c = ftctl_command(&["vm", "list"]);
    c.env("FTCTL_API", &dead)
        .env("FTCTL_TOKEN_FILE", d.token_file());
    let run = Run::of(c.output().unwrap(), &["vm", "list"]);
    assert_eq!(run.code, 1, "{run:?}");
    assert!(run.stderr.contains("cannot reach the API"), "{run:?}");
}

#[test]
fn lab_env_points_ftctl_at_the_lab_api() {
    // A lab folder whose path needs quoting; nothing is started.
    let root = tempfile::Builder::new()
        .prefix("ftlab it's")
        .tempdir()
        .unwrap();
    let script = format!(
        "eval \"$('{}' lab env --lab envtest --node b)\" && printf '%s\\n%s\\n' \"$FTCTL_API\" \"$FTCTL_TOKEN_FILE\"",
        env!("CARGO_BIN_EXE_ftctl")
    );
    let out = Command::new("sh")
        .args(["-c", &script])
        .env("FTLAB_DIR", root.path())
        .env_remove("FTCTL_API")
        .env_remove("FTCTL_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 2, "{out:?}");
    // Both nodes' APIs, the one asked for (b) first.
    let apis: Vec<&str> = lines[0].split(',').collect();
    assert_eq!(apis.len(), 2, "{out:?}");
    assert!(
        apis[0].starts_with("http://10.77.") && apis[0].ends_with(".12:7200"),
        "{out:?}"
    );
    assert!(apis[1].ends_with(".11:7200"), "{out:?}");
    assert_eq!(
        Path::new(lines[1]),
        root.path().join("envtest").join("api-token"),
        "{out:?}"
    );
    // Nothing was made.
    assert!(!root.path().join("envtest").exists());
}
