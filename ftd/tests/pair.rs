//! Two real daemons on loopback joined by the pair channel (ft-link over
//! TCP, authenticated with the pair secret): definitions made on either
//! node show on both, a node that was away catches up, a daemon that
//! never heard its peer starts no VM, and a wrong secret joins nothing.
//! With a quorum witness (a real one, in this process): a node that comes
//! back to find its VM running elsewhere at a newer generation becomes
//! its standby without starting it; without one, `vm show` says what
//! policy holds instead.

mod common;

use std::time::{Duration, Instant};

use common::{free_port, Daemon, EventStream};
use serde_json::{json, Value};

struct Pair {
    a: Daemon,
    b: Daemon,
}

fn pair_with_secrets(secret_a: &str, secret_b: &str) -> Pair {
    pair_with(secret_a, secret_b, None)
}

/// A pair whose daemons name `witness` (host:port) as their witness.
fn pair_with(secret_a: &str, secret_b: &str, witness: Option<&str>) -> Pair {
    let (api_a, api_b) = (free_port(), free_port());
    let (pair_a, pair_b) = (free_port(), free_port());
    let secrets = tempfile::tempdir().unwrap();
    let file = |name: &str, secret: &str| {
        let p = secrets.path().join(name);
        std::fs::write(&p, secret).unwrap();
        p.to_string_lossy().into_owned()
    };
    let args = |me_pair: u16, peer: &str, peer_api: u16, peer_pair: u16, secret: String| {
        let witness = witness.map(|w| vec!["--witness".to_string(), w.to_string()]);
        let mut args = vec![
            "--pair".to_string(),
            format!("127.0.0.1:{me_pair}"),
            "--peer-name".into(),
            peer.into(),
            "--peer-api".into(),
            format!("127.0.0.1:{peer_api}"),
            "--peer-pair".into(),
            format!("127.0.0.1:{peer_pair}"),
            "--peer-alink".into(),
            "127.0.0.1:17900".into(),
            "--secret-file".into(),
            secret,
        ];
        args.extend(witness.into_iter().flatten());
        args
    };
    let a = Daemon::init_with(
        "node-a",
        api_a,
        &args(pair_a, "node-b", api_b, pair_b, file("a", secret_a)),
    );
    let b = Daemon::init_with(
        "node-b",
        api_b,
        &args(pair_b, "node-a", api_a, pair_a, file("b", secret_b)),
    );
    Pair { a, b }
}

fn pair() -> Pair {
    pair_with_secrets(
        "the-pair-secret-of-this-test-0001",
        "the-pair-secret-of-this-test-0001",
    )
}

fn kernel(d: &Daemon) -> String {
    let p = d.state_dir().join("vmlinux");
    std::fs::write(&p, b"not a kernel").unwrap();
    p.to_string_lossy().into_owned()
}

fn create(d: &Daemon, name: &str, kernel: &str) -> Value {
    let (status, vm) = d.call(
        "POST",
        "/api/vms",
        "/api/vms",
        Some(json!({"name": name, "kernel": kernel, "disks": [{"size_mib": 8}], "nics": [{}]})),
    );
    assert_eq!(status, 201, "{vm}");
    vm
}

/// Polls `d`'s `path` until `want` holds.
fn eventually(d: &Daemon, path: &str, what: &str, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (status, body) = d.call("GET", path, "-", None);
        if status == 200 && want(&body) {
            return body;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: {path} is {body}; log:\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn names(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn definitions_reach_both_nodes_and_a_returning_node_catches_up() {
    let mut p = pair();
    // Both see each other.
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes", "the peer is up", |nodes| {
            nodes.as_array().unwrap().iter().all(|n| n["state"] == "up")
        });
    }
    // The kernel must exist on the node that checks the definition; the
    // same path stands on both (one host).
    let k = kernel(&p.a);
    let made = create(&p.a, "vm-one", &k);
    let on_b = eventually(&p.b, "/api/vms/vm-one", "vm-one on b", |v| {
        v["name"] == "vm-one"
    });
    assert_eq!(on_b["definition"], made["definition"]);
    // And from b to a.
    create(&p.b, "vm-two", &k);
    eventually(&p.a, "/api/vms", "vm-two on a", |l| {
        names(l) == ["vm-one", "vm-two"]
    });

    // b goes away; a changes things; b returns and catches up.
    p.b.stop();
    eventually(&p.a, "/api/nodes/node-b", "b unreachable", |n| {
        n["state"] == "unreachable"
    });
    let (status, _) = p.a.call("DELETE", "/api/vms/vm-two", "-", None);
    assert_eq!(status, 204);
    let (status, _) = p.a.call("POST", "/api/vms/vm-one/unprotect", "-", None);
    assert_eq!(status, 200);
    create(&p.a, "vm-three", &k);
    p.b.start();
    let list = eventually(&p.b, "/api/vms", "b caught up", |l| {
        names(l) == ["vm-one", "vm-three"] && l[0]["level"] == "unprotected"
    });
    assert_eq!(list, p.a.call("GET", "/api/vms", "-", None).1);
    // The store kept what b learned: after a restart of b without a, the
    // VMs are there.
    p.a.stop();
    p.b.stop();
    p.b.start();
    assert_eq!(
        names(&p.b.call("GET", "/api/vms", "-", None).1),
        ["vm-one", "vm-three"]
    );
    // The events say where changes came from.
    let (_, events) = p.b.call("GET", "/api/events?limit=1000", "-", None);
    assert!(events
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["message"].as_str().unwrap().contains("deleted on node-a")));
}

/// The entries of `list` (events or audit) that `node` logged, as they
/// were logged there (numbers aside: each node numbers its own list).
fn logged_by(list: &Value, node: &str) -> Vec<Value> {
    list.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["node"] == node)
        .map(|e| {
            let mut e = e.clone();
            e.as_object_mut().unwrap().remove("id");
            e
        })
        .collect()
}

/// Waits until `on` holds every entry `origin` logged (`path`: its events
/// or audit log), each once and in order.
fn holds_all_of(on: &Daemon, origin: &Daemon, node: &str, path: &str) {
    let start = Instant::now();
    loop {
        let want = logged_by(&origin.call("GET", path, "-", None).1, node);
        let have = logged_by(&on.call("GET", path, "-", None).1, node);
        if !want.is_empty() && have == want {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{path}: {node} logged {want:#?}\nthe other node holds {have:#?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Either node's API shows both nodes' events and audit logs: what the
/// peer logged comes over the pair channel (live on the event stream
/// too), and a node that was away, or whose peer restarted, catches up
/// without taking anything twice.
#[test]
fn either_node_shows_both_nodes_events_and_audit_log_each_entry_once() {
    let mut p = pair();
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes", "the peer is up", |nodes| {
            nodes.as_array().unwrap().iter().all(|n| n["state"] == "up")
        });
    }
    let mut a_stream = EventStream::open(&p.a);
    let k = kernel(&p.a);
    create(&p.b, "made-on-b", &k);
    let streamed = a_stream.next_where(Duration::from_secs(10), |e| {
        e["node"] == "node-b" && e["vm"] == "made-on-b"
    });
    assert!(
        streamed["message"].as_str().unwrap().contains("defined"),
        "{streamed}"
    );
    const EVENTS: &str = "/api/events?limit=1000";
    const AUDIT: &str = "/api/audit?limit=1000";
    holds_all_of(&p.a, &p.b, "node-b", EVENTS);
    holds_all_of(&p.a, &p.b, "node-b", AUDIT);
    holds_all_of(&p.b, &p.a, "node-a", EVENTS);
    let audit_on_a = p.a.call("GET", AUDIT, "-", None).1;
    assert!(
        logged_by(&audit_on_a, "node-b")
            .iter()
            .any(|e| e["action"] == "POST /api/vms" && e["status"] == 201),
        "{audit_on_a}"
    );

    // a goes away while b logs on; a returns and catches up.
    p.a.stop();
    create(&p.b, "made-while-a-was-away", &k);
    p.a.start();
    holds_all_of(&p.a, &p.b, "node-b", EVENTS);
    holds_all_of(&p.a, &p.b, "node-b", AUDIT);
    // b restarts (its session with a starts over, from what a holds).
    p.b.stop();
    p.b.start();
    create(&p.a, "made-on-a", &k);
    for (on, origin, node) in [(&p.a, &p.b, "node-b"), (&p.b, &p.a, "node-a")] {
        holds_all_of(on, origin, node, EVENTS);
        holds_all_of(on, origin, node, AUDIT);
    }
    let events_on_a = p.a.call("GET", EVENTS, "-", None).1;
    assert!(
        logged_by(&events_on_a, "node-b")
            .iter()
            .any(|e| e["vm"] == "made-while-a-was-away"),
        "{events_on_a}"
    );
}

#[test]
fn a_node_that_never_heard_its_peer_starts_no_vm() {
    let mut p = pair();
    let k = kernel(&p.a);
    create(&p.a, "vm-one", &k);
    eventually(&p.b, "/api/vms", "replicated", |l| names(l) == ["vm-one"]);
    let (status, _) = p.a.call("POST", "/api/vms/vm-one/start", "-", None);
    assert_eq!(status, 202);
    // The role cannot run on this host: its start is attempted and fails
    // visibly (the alert names the missing ftprotect).
    let start_failed = |e: &Value| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.contains("cannot start its primary"))
    };
    eventually(&p.a, "/api/events?alerts=true&limit=1000", "a tried", |l| {
        l.as_array().unwrap().iter().any(start_failed)
    });
    // Both daemons go; a comes back alone: it must wait for b.
    p.a.stop();
    p.b.stop();
    p.a.start();
    let last_id = {
        let (_, l) = p.a.call("GET", "/api/events?limit=1", "-", None);
        l[0]["id"].as_u64().unwrap()
    };
    eventually(
        &p.a,
        &format!("/api/events?after={}&limit=1000", last_id.saturating_sub(5)),
        "a waits",
        |l| {
            l.as_array().unwrap().iter().any(|e| {
                e["message"]
                    .as_str()
                    .unwrap()
                    .contains("waiting to hear the peer")
            })
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    let (_, after) = p.a.call(
        "GET",
        &format!("/api/events?after={last_id}&limit=1000"),
        "-",
        None,
    );
    assert!(
        !after.as_array().unwrap().iter().any(start_failed),
        "a started a role without hearing b: {after}"
    );
    // b returns: a hears it and starts the VM's primary.
    p.b.start();
    eventually(
        &p.a,
        &format!("/api/events?after={last_id}&limit=1000"),
        "a starts after hearing b",
        |l| l.as_array().unwrap().iter().any(start_failed),
    );
}

#[test]
fn a_wrong_secret_joins_nothing() {
    let p = pair_with_secrets(
        "the-pair-secret-of-this-test-0001",
        "a-different-secret-entirely-0002",
    );
    let refusals = |d: &Daemon| {
        d.log()
            .matches("pair channel: a connection was refused")
            .count()
    };
    let k = kernel(&p.a);
    let before = refusals(&p.b);
    create(&p.a, "vm-one", &k);
    // Wait for the evidence: b refused a handshake of a's after the VM was
    // defined (a redials every second), so a's state did not get through.
    let start = Instant::now();
    while refusals(&p.b) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "b never refused a's handshake; b's log:\n{}",
            p.b.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(names(&p.b.call("GET", "/api/vms", "-", None).1).is_empty());
    let (_, node) = p.a.call("GET", "/api/nodes/node-b", "-", None);
    assert_eq!(node["state"], "unknown", "{node}");
}

#[test]
fn a_second_node_joins_with_ftd_join() {
    // The first node alone.
    let (api_a, pair_a) = (free_port(), free_port());
    let a = Daemon::init_with(
        "node-a",
        api_a,
        &["--pair".into(), format!("127.0.0.1:{pair_a}")],
    );
    let k = kernel(&a);
    create(&a, "vm-one", &k);
    // The second joins with the first node's token.
    let (api_b, pair_b) = (free_port(), free_port());
    let dir_b = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftd"))
        .arg("--state-dir")
        .arg(dir_b.path())
        .args(["join", "--from", &a.url, "--token-file"])
        .arg(a.state_dir().join("api-token"))
        .args(["--node", "node-b", "--api", &format!("127.0.0.1:{api_b}")])
        .args(["--pair", &format!("127.0.0.1:{pair_b}")])
        .args([
            "--alink",
            "127.0.0.1:17950",
            "--ftprotect",
            "/nonexistent/ftprotect",
        ])
        .arg("--run-dir")
        .arg(dir_b.path().join("run"))
        .output()
        .unwrap();
    assert!(out.status.success(), "ftd join: {out:?}");
    // The same secret and token on both.
    for file in ["pair-secret", "api-token"] {
        assert_eq!(
            std::fs::read_to_string(a.state_dir().join(file))
                .unwrap()
                .trim(),
            std::fs::read_to_string(dir_b.path().join(file))
                .unwrap()
                .trim(),
            "{file}"
        );
    }
    let mut b = Daemon::adopt_dir(dir_b, api_b, &a.token);
    b.start();
    // a restarted itself with its new peer; they pair and b gets the VM.
    eventually(&b, "/api/vms", "vm-one reaches b", |l| {
        names(l) == ["vm-one"]
    });
    eventually(&a, "/api/nodes/node-b", "a sees b", |n| n["state"] == "up");
    // The read of the secret and the join are in a's audit log.
    let (_, audit) = a.call("GET", "/api/audit", "-", None);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert!(actions.contains(&"GET /api/pair"), "{actions:?}");
    assert!(actions.contains(&"POST /api/pair/peer"), "{actions:?}");
    // A third node cannot join a full pair.
    let dir_c = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_ftd"))
        .arg("--state-dir")
        .arg(dir_c.path())
        .args(["join", "--from", &a.url, "--token-file"])
        .arg(a.state_dir().join("api-token"))
        .args([
            "--node",
            "node-c",
            "--api",
            "127.0.0.1:1",
            "--alink",
            "127.0.0.1:2",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("paired with node-b"), "{stderr}");
}

const SECRET: &str = "the-pair-secret-of-this-test-0001";

/// A real witness on loopback, served by a runtime of its own.
struct Witness {
    addr: String,
    runtime: tokio::runtime::Runtime,
    _dir: tempfile::TempDir,
}

fn witness() -> Witness {
    use witness::registry::Timing;
    use witness::server::{Server, ServerConfig};
    let dir = tempfile::tempdir().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let server = runtime
        .block_on(Server::bind(ServerConfig {
            listen: "127.0.0.1:0".into(),
            secret: ft_link::PairSecret::new(SECRET.as_bytes().to_vec()).unwrap(),
            name: "witness".into(),
            timing: Timing {
                silence: Duration::from_millis(300),
                startup_grace: Duration::ZERO,
            },
            database: dir.path().join("witness.sqlite"),
        }))
        .unwrap();
    let addr = server.local_addr().to_string();
    runtime.spawn(server.serve());
    Witness {
        addr,
        runtime,
        _dir: dir,
    }
}

impl Witness {
    /// `node` tells the witness it runs `vm` at `generation`.
    fn hold(&self, node: &str, vm: &str, generation: u64) {
        let client = witness::WitnessClient::new(
            vec![self.addr.clone()],
            ft_link::PairSecret::new(SECRET.as_bytes().to_vec()).unwrap(),
            node,
            Duration::from_secs(2),
        );
        let answer = self.runtime.block_on(client.ask(&witness::Request::Hold {
            vm: vm.into(),
            generation,
        }));
        assert!(
            matches!(answer, Ok(witness::Answer::Held { .. })),
            "{answer:?}"
        );
    }
}

#[test]
fn with_a_witness_a_node_back_to_find_its_vm_failed_over_becomes_the_standby() {
    let w = witness();
    let mut p = pair_with(SECRET, SECRET, Some(&w.addr));
    let k = kernel(&p.a);
    create(&p.a, "vm-one", &k);
    eventually(&p.b, "/api/vms", "replicated", |l| names(l) == ["vm-one"]);
    let (_, vm) = p.a.call("GET", "/api/vms/vm-one", "-", None);
    assert_eq!(vm["warnings"], json!([]), "a witness is configured: {vm}");
    let (status, vm) = p.a.call("POST", "/api/vms/vm-one/start", "-", None);
    assert_eq!(status, 202, "{vm}");
    let generation = vm["generation"].as_u64().unwrap();
    // (The role cannot run on this host: its start fails visibly.)
    eventually(&p.a, "/api/events?alerts=true&limit=1000", "a tried", |l| {
        l.as_array().unwrap().iter().any(|e| {
            e["message"]
                .as_str()
                .is_some_and(|m| m.contains("cannot start its primary"))
        })
    });
    let last_id = {
        let (_, l) = p.a.call("GET", "/api/events?limit=1", "-", None);
        l[0]["id"].as_u64().unwrap()
    };
    // Both daemons go; meanwhile b took the VM over (the witness granted
    // it a newer generation).
    p.a.stop();
    p.b.stop();
    w.hold("node-b", "vm-one", generation + 5);
    // a comes back alone: it asks the witness instead of waiting for b.
    p.a.start();
    let vm = eventually(&p.a, "/api/vms/vm-one", "b is the primary now", |vm| {
        vm["primary_node"] == "node-b"
    });
    assert_eq!(vm["generation"].as_u64(), Some(generation + 5), "{vm}");
    let (_, events) = p.a.call(
        "GET",
        &format!("/api/events?after={last_id}&limit=1000"),
        "-",
        None,
    );
    let said = |text: &str| {
        events
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["message"].as_str().unwrap().contains(text))
    };
    assert!(
        said("the witness says node node-b runs it"),
        "the takeover by the witness's word is an event: {events}"
    );
    assert!(
        !said("cannot start its primary"),
        "a started the stale primary: {events}"
    );
    // It goes on as the standby.
    eventually(
        &p.a,
        &format!("/api/events?after={last_id}&limit=1000"),
        "a starts the standby",
        |l| {
            l.as_array().unwrap().iter().any(|e| {
                e["message"]
                    .as_str()
                    .unwrap()
                    .contains("cannot start its standby")
            })
        },
    );
    // The witness goes away: an alert says what that means.
    assert!(p.a.metrics().contains("ftvm_witness_reachable 1"));
    drop(w);
    let alert = |l: &Value| {
        l.as_array().unwrap().iter().any(|e| {
            e["message"]
                .as_str()
                .unwrap()
                .contains("a node lost now is not taken over")
        })
    };
    eventually(
        &p.a,
        "/api/events?alerts=true&limit=1000",
        "witness alert",
        alert,
    );
    assert!(p.a.metrics().contains("ftvm_witness_reachable 0"));
}

#[test]
fn without_a_witness_vm_show_states_the_policy() {
    let p = pair();
    let k = kernel(&p.a);
    create(&p.a, "vm-one", &k);
    let (_, vm) = p.a.call("GET", "/api/vms/vm-one", "-", None);
    let warnings = vm["warnings"].as_array().unwrap();
    assert!(
        warnings
            .iter()
            .any(|w| w.as_str().unwrap().contains("no quorum witness")),
        "{vm}"
    );
}

/// `d`'s view of `node`'s maintenance.
fn maintenance(d: &Daemon, node: &str) -> Value {
    d.call("GET", &format!("/api/nodes/{node}"), "-", None).1["maintenance"].clone()
}

/// Asks `d` to move `node`'s maintenance (`enter` or `exit`).
fn maintenance_step(d: &Daemon, node: &str, step: &str) -> (u16, Value) {
    d.call(
        "POST",
        &format!("/api/nodes/{node}/maintenance/{step}"),
        "-",
        None,
    )
}

#[test]
fn node_maintenance_travels_between_the_nodes_and_is_refused_when_it_cannot_hold() {
    let mut p = pair();
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes", "the peer is up", |nodes| {
            nodes.as_array().unwrap().iter().all(|n| n["state"] == "up")
        });
    }
    let k = kernel(&p.a);
    create(&p.a, "vm-one", &k);
    // An unprotected VM on node-a could leave only by a reboot: refused,
    // named.
    let (status, _) = p.a.call("POST", "/api/vms/vm-one/unprotect", "-", None);
    assert_eq!(status, 200);
    let (status, vm) = p.a.call("POST", "/api/vms/vm-one/start", "-", None);
    assert_eq!(
        (status, &vm["primary_node"]),
        (202, &json!("node-a")),
        "{vm}"
    );
    eventually(&p.b, "/api/vms/vm-one", "b knows vm-one runs", |v| {
        v["desired"] == "running"
    });
    let (status, refused) = maintenance_step(&p.b, "node-a", "enter");
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["message"].as_str().unwrap().contains("vm-one"),
        "{refused}"
    );
    let (status, _) = p.a.call("POST", "/api/vms/vm-one/stop", "-", None);
    assert_eq!(status, 202);
    // node-b must know of the stop before it is asked (the records travel
    // on the pair channel: asked at once, it may still see vm-one running).
    eventually(&p.b, "/api/vms/vm-one", "b knows vm-one stopped", |v| {
        v["desired"] == "stopped"
    });

    // Asked of node-b for node-a: both nodes see it; with no VM running
    // there it is on maintenance at once.
    let (status, node) = maintenance_step(&p.b, "node-a", "enter");
    assert_eq!(status, 202, "{node}");
    // (With nothing to move, the step may be over before the answer.)
    assert!(
        node["maintenance"] == "entering" || node["maintenance"] == "on",
        "{node}"
    );
    assert!(node["maintenance_by"]
        .as_str()
        .unwrap()
        .starts_with("admin@127.0.0.1"));
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes/node-a", "node-a on maintenance", |n| {
            n["maintenance"] == "on" && n["maintenance_waiting"] == json!([])
        });
    }
    let metrics = p.a.metrics();
    assert!(
        metrics.contains("ftvm_node_maintenance{node=\"node-a\",state=\"on\"} 1"),
        "{metrics}"
    );
    // Twice, or the other node as well: refused with the reason.
    let (status, refused) = maintenance_step(&p.a, "node-a", "enter");
    assert_eq!(status, 409);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("in maintenance already"),
        "{refused}"
    );
    let (status, refused) = maintenance_step(&p.a, "node-b", "enter");
    assert_eq!(status, 409);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("node node-a is in maintenance"),
        "{refused}"
    );
    // A VM that prefers node-a starts on node-b meanwhile; at level ft the
    // node leaves maintenance only once it is protected (it cannot be
    // here: the kernel is not one) or stopped.
    let (status, _) = p.a.call("POST", "/api/vms/vm-one/protect", "-", None);
    assert_eq!(status, 200);
    let (status, vm) = p.a.call("POST", "/api/vms/vm-one/start", "-", None);
    assert_eq!(
        (status, &vm["primary_node"]),
        (202, &json!("node-b")),
        "{vm}"
    );
    let (status, node) = maintenance_step(&p.a, "node-a", "exit");
    assert_eq!(
        (status, &node["maintenance"]),
        (202, &json!("leaving")),
        "{node}"
    );
    let leaving = eventually(&p.b, "/api/nodes/node-a", "node-a leaving", |n| {
        n["maintenance"] == "leaving"
            && n["maintenance_waiting"]
                .as_array()
                .is_some_and(|w| w.iter().any(|l| l.as_str().unwrap().contains("vm-one")))
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(maintenance(&p.a, "node-a"), "leaving", "{leaving}");
    let (status, _) = p.a.call("POST", "/api/vms/vm-one/stop", "-", None);
    assert_eq!(status, 202);
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes/node-a", "node-a back in service", |n| {
            n["maintenance"] == "off"
        });
    }
    let (status, refused) = maintenance_step(&p.b, "node-a", "exit");
    assert_eq!(status, 409);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("not in maintenance"),
        "{refused}"
    );
    // Every step is in the event log (of the node that did it), and the
    // requests in the audit log with who asked.
    let events: Vec<Value> = [&p.a, &p.b]
        .iter()
        .flat_map(|d| {
            let (_, events) = d.call("GET", "/api/events?limit=1000", "-", None);
            events.as_array().unwrap().clone()
        })
        .collect();
    let events = Value::Array(events);
    for said in [
        "node node-a entering maintenance (asked by admin@127.0.0.1",
        "node node-a is in maintenance",
        "node node-a leaving maintenance (asked by admin@127.0.0.1",
        "node node-a is back in service",
    ] {
        assert!(
            events
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["message"].as_str().unwrap().contains(said)),
            "no event {said:?}: {events}"
        );
    }
    let (_, audit) = p.b.call("GET", "/api/audit?limit=1000", "-", None);
    assert!(
        audit.as_array().unwrap().iter().any(|e| e["action"]
            == "POST /api/nodes/node-a/maintenance/enter"
            && e["status"] == 202
            && e["who"].as_str().unwrap().starts_with("admin@")),
        "{audit}"
    );
    // Node a in maintenance and node b away: a VM that prefers b does not
    // start on a (the node said safe to pull).
    let (status, node) = maintenance_step(&p.a, "node-a", "enter");
    assert_eq!(status, 202, "{node}");
    eventually(&p.a, "/api/nodes/node-a", "node-a on maintenance", |n| {
        n["maintenance"] == "on"
    });
    let (status, vm) = p.a.call(
        "POST",
        "/api/vms",
        "-",
        Some(json!({"name": "vm-b", "kernel": k, "preferred_node": "node-b"})),
    );
    assert_eq!(status, 201, "{vm}");
    p.b.stop();
    eventually(&p.a, "/api/nodes/node-b", "b unreachable", |n| {
        n["state"] == "unreachable"
    });
    let (status, refused) = p.a.call("POST", "/api/vms/vm-b/start", "-", None);
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("this node (node-a) is in maintenance"),
        "{refused}"
    );
    // Leaving needs no peer (nothing runs to protect): back in service.
    let (status, _) = maintenance_step(&p.a, "node-a", "exit");
    assert_eq!(status, 202);
    eventually(&p.a, "/api/nodes/node-a", "node-a back", |n| {
        n["maintenance"] == "off"
    });
    // A node whose peer is away cannot enter maintenance (nothing would
    // take its VMs).
    let (status, refused) = maintenance_step(&p.a, "node-a", "enter");
    assert_eq!(status, 409);
    assert!(
        refused["message"]
            .as_str()
            .unwrap()
            .contains("node node-b is not reachable"),
        "{refused}"
    );
    assert_eq!(maintenance(&p.a, "node-a"), "off");
}

#[test]
fn a_console_user_made_on_one_node_logs_in_on_both() {
    let p = pair();
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes", "the peer is up", |nodes| {
            nodes.as_array().unwrap().iter().all(|n| n["state"] == "up")
        });
    }
    let (status, body) = p.a.call(
        "PUT",
        "/api/users/alice",
        "-",
        Some(json!({"password": "correct horse battery"})),
    );
    assert_eq!(status, 200, "{body}");
    eventually(&p.b, "/api/users", "alice reaches b", |users| {
        users
            .as_array()
            .unwrap()
            .iter()
            .any(|u| u["name"] == "alice")
    });
    let login = json!({"user": "alice", "password": "correct horse battery"});
    let (status, body) = p.b.raw(
        "POST",
        "/api/session",
        "-",
        None,
        Some("application/json"),
        Some(login.to_string().as_bytes()),
    );
    assert_eq!(
        (status, body["user"].clone()),
        (200, json!("alice")),
        "{body}"
    );
    // Deleted on b: gone from a too.
    let (status, _) = p.b.call("DELETE", "/api/users/alice", "-", None);
    assert_eq!(status, 204);
    eventually(&p.a, "/api/users", "the delete reaches a", |users| {
        users.as_array().unwrap().is_empty()
    });
}

/// Level HA through the API: a VM is protected at ha (the level reaches
/// the peer) and changes level while it runs (its engine goes on at the
/// new one without a reboot: the lab's tests run that part).
#[test]
fn a_vm_is_protected_at_level_ha_and_changes_level_while_it_runs() {
    let p = pair();
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes", "the peer is up", |nodes| {
            nodes.as_array().unwrap().iter().all(|n| n["state"] == "up")
        });
    }
    let k = kernel(&p.a);
    create(&p.a, "vm-ha", &k);
    let (status, vm) =
        p.a.call("POST", "/api/vms/vm-ha/protect?level=ha", "-", None);
    assert_eq!((status, &vm["level"]), (200, &json!("ha")), "{vm}");
    eventually(&p.b, "/api/vms/vm-ha", "level ha on b", |v| {
        v["level"] == "ha"
    });
    let (status, started) = p.a.call("POST", "/api/vms/vm-ha/start", "-", None);
    assert_eq!(status, 202, "{started}");
    for (path, level) in [
        ("/api/vms/vm-ha/protect", "ft"),
        ("/api/vms/vm-ha/protect?level=ha", "ha"),
        ("/api/vms/vm-ha/unprotect", "unprotected"),
    ] {
        let (status, vm) = p.a.call("POST", path, "-", None);
        assert_eq!((status, &vm["level"]), (200, &json!(level)), "{vm}");
        eventually(&p.b, "/api/vms/vm-ha", "the level on b", |v| {
            v["level"] == level
        });
    }
}

#[test]
fn a_switchover_asked_on_the_node_without_the_primary_is_asked_of_the_node_with_it() {
    let p = pair();
    for d in [&p.a, &p.b] {
        eventually(d, "/api/nodes", "the peer is up", |nodes| {
            nodes.as_array().unwrap().iter().all(|n| n["state"] == "up")
        });
    }
    let k = kernel(&p.a);
    create(&p.a, "vm-moved", &k);
    let (status, vm) = p.a.call("POST", "/api/vms/vm-moved/protect", "-", None);
    assert_eq!(status, 200, "{vm}");
    let (status, started) = p.a.call("POST", "/api/vms/vm-moved/start", "-", None);
    assert_eq!(status, 202, "{started}");
    eventually(
        &p.b,
        "/api/vms/vm-moved",
        "the primary on a, seen by b",
        |v| v["primary_node"] == "node-a",
    );
    // Asked to move it from b, where it does not run: refused at once
    // (it "moved already"; asked again, it would move back).
    switchover_refused(
        &p.b,
        "vm-moved?from=node-b",
        409,
        "runs on node-a, not on node-b: it moved already",
    );
    // Node b passes the request to node a, whose engine is no protected
    // primary here (no guest boots on this host): a's refusal, with a's
    // reason, is b's answer.
    let message = switchover_refused(&p.b, "vm-moved?from=node-a", 409, "VM vm-moved");
    assert!(
        message.starts_with("node-a answered: no switchover: "),
        "{message}"
    );
    eventually(
        &p.a,
        "/api/events?vm=vm-moved",
        "a's event of the ask",
        |events| {
            events.as_array().unwrap().iter().any(|e| {
                e["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("a move asked through node-b's API by admin"))
            })
        },
    );
    // A VM neither node knows is refused by b itself, without asking a.
    switchover_refused(&p.b, "nope", 404, "nope");

    // With a's daemon gone, b says the pair channel is down.
    let mut a = p.a;
    a.stop();
    eventually(&p.b, "/api/nodes", "a unreachable", |nodes| {
        nodes.as_array().unwrap().iter().any(|n| n["state"] != "up")
    });
    switchover_refused(&p.b, "vm-moved", 409, "the pair channel to node-a is down");
}

/// `POST /api/vms/{vm_and_query}/switchover` on `d` must be refused with
/// `status` and a message containing `says`; returns the message.
fn switchover_refused(d: &Daemon, vm_and_query: &str, status: u16, says: &str) -> String {
    let (vm, query) = vm_and_query
        .split_once('?')
        .map_or((vm_and_query, String::new()), |(v, q)| (v, format!("?{q}")));
    let (got, body) = d.call(
        "POST",
        &format!("/api/vms/{vm}/switchover{query}"),
        "/api/vms/{name}/switchover",
        None,
    );
    let message = body["message"].as_str().unwrap_or_default().to_string();
    assert_eq!(got, status, "{body}");
    assert!(message.contains(says), "{says:?} not in {body}");
    message
}
