//! The REST API, end to end: the real `ftd` binary on a loopback port with
//! its real database in a temporary state directory, asked over HTTP.
//! Every endpoint, bad input of each kind (each answered with its 4xx and
//! a JSON reason, the state unchanged), the audit log, the OpenAPI
//! document against the answers, the metrics through `promtool`, and the
//! store across a restart.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Daemon, EventStream};
use serde_json::{json, Value};

/// A file that exists, to stand for a kernel in definitions (nothing
/// boots here).
fn kernel_file(d: &Daemon) -> String {
    let path = d.state_dir().join("vmlinux");
    if !path.exists() {
        std::fs::write(&path, b"not a kernel").unwrap();
    }
    path.to_string_lossy().into_owned()
}

fn vm_body(d: &Daemon, name: &str) -> Value {
    json!({
        "name": name,
        "kernel": kernel_file(d),
        "memory_mib": 128,
        "disks": [{"size_mib": 16}],
        "nics": [{"mac": "52:54:00:f7:00:64"}],
        "level": "unprotected"
    })
}

fn vm_names(d: &Daemon) -> Vec<String> {
    let (status, list) = d.call("GET", "/api/vms", "/api/vms", None);
    assert_eq!(status, 200);
    list.as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect()
}

fn assert_error(answer: &(u16, Value), status: u16, code: &str) {
    assert_eq!(answer.0, status, "{answer:?}");
    assert_eq!(answer.1["error"], code, "{answer:?}");
    assert!(
        answer.1["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{answer:?}"
    );
}

#[test]
fn every_endpoint_needs_the_token() {
    let d = Daemon::init();
    let protected = [
        ("GET", "/api/nodes", "/api/nodes"),
        ("GET", "/api/nodes/node-a", "/api/nodes/{name}"),
        (
            "POST",
            "/api/nodes/node-a/maintenance/enter",
            "/api/nodes/{name}/maintenance/enter",
        ),
        (
            "POST",
            "/api/nodes/node-a/maintenance/exit",
            "/api/nodes/{name}/maintenance/exit",
        ),
        ("GET", "/api/vms", "/api/vms"),
        ("POST", "/api/vms", "/api/vms"),
        ("GET", "/api/vms/x", "/api/vms/{name}"),
        ("DELETE", "/api/vms/x", "/api/vms/{name}"),
        ("POST", "/api/vms/x/start", "/api/vms/{name}/start"),
        ("POST", "/api/vms/x/stop", "/api/vms/{name}/stop"),
        ("POST", "/api/vms/x/protect", "/api/vms/{name}/protect"),
        ("POST", "/api/vms/x/unprotect", "/api/vms/{name}/unprotect"),
        ("GET", "/api/events", "/api/events"),
        ("GET", "/api/events/stream", "/api/events/stream"),
        ("GET", "/api/audit", "/api/audit"),
    ];
    for (method, path, template) in protected {
        let none = d.raw(method, path, template, None, None, None);
        assert_error(&none, 401, "unauthorized");
        let wrong = d.raw(method, path, template, Some("0123abcd"), None, None);
        assert_error(&wrong, 401, "unauthorized");
    }
    // The open ones.
    assert_eq!(
        d.raw("GET", "/api/health", "/api/health", None, None, None)
            .0,
        200
    );
    assert_eq!(
        d.raw("GET", "/api/openapi.json", "-", None, None, None).0,
        200
    );
    // Refused mutations are audited, with who tried.
    let (_, audit) = d.call("GET", "/api/audit?limit=1000", "/api/audit", None);
    let entries = audit.as_array().unwrap();
    assert!(entries
        .iter()
        .any(|e| e["who"].as_str().unwrap().starts_with("anonymous@")
            && e["action"] == "POST /api/vms"
            && e["status"] == 401));
    assert!(entries
        .iter()
        .any(|e| e["who"].as_str().unwrap().starts_with("bad-token@")
            && e["action"] == "DELETE /api/vms/x"));
    check_answers_are_documented(&d);
}

#[test]
fn a_vm_is_defined_started_stopped_and_deleted() {
    let d = Daemon::init();
    let (status, vm) = d.call(
        "POST",
        "/api/vms",
        "/api/vms",
        Some(vm_body(&d, "ledger-vm")),
    );
    assert_eq!(status, 201, "{vm}");
    assert_eq!(vm["name"], "ledger-vm");
    assert_eq!(vm["state"], "stopped");
    assert_eq!(vm["level"], "unprotected");
    assert_eq!(vm["definition"]["preferred_node"], "node-a");
    assert_eq!(vm["definition"]["nics"][0], "52:54:00:f7:00:64");
    assert_eq!(vm["definition"]["vcpus"], 1);

    let (status, shown) = d.call("GET", "/api/vms/ledger-vm", "/api/vms/{name}", None);
    assert_eq!(status, 200);
    assert_eq!(shown, vm);
    assert_eq!(vm_names(&d), ["ledger-vm"]);

    // Start: the store says running on node-a; the role cannot start on
    // this host (no ftprotect): an alert says so.
    let (status, started) = d.call(
        "POST",
        "/api/vms/ledger-vm/start",
        "/api/vms/{name}/start",
        None,
    );
    assert_eq!(status, 202, "{started}");
    assert_eq!(started["desired"], "running");
    assert_eq!(started["primary_node"], "node-a");
    assert_eq!(started["generation"], 1);
    assert_error(
        &d.call(
            "POST",
            "/api/vms/ledger-vm/start",
            "/api/vms/{name}/start",
            None,
        ),
        409,
        "conflict",
    );
    assert_error(
        &d.call("DELETE", "/api/vms/ledger-vm", "/api/vms/{name}", None),
        409,
        "conflict",
    );
    let alert = wait_for_event(&d, |e| {
        e["alert"] == true
            && e["message"]
                .as_str()
                .unwrap()
                .contains("cannot start its primary")
    });
    assert!(
        alert["message"]
            .as_str()
            .unwrap()
            .contains("/nonexistent/ftprotect"),
        "{alert}"
    );
    let (_, node) = d.call("GET", "/api/nodes/node-a", "/api/nodes/{name}", None);
    assert_eq!(node["primaries"], json!(["ledger-vm"]));
    assert_eq!(node["state"], "up");
    assert_eq!(node["local"], true);

    // A forced takeover needs a standby here that waits for the witness.
    let refused = d.call(
        "POST",
        "/api/vms/ledger-vm/takeover",
        "/api/vms/{name}/takeover",
        None,
    );
    assert!(
        refused.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("no takeover to force")),
        "{refused:?}"
    );
    assert_error(&refused, 409, "conflict");
    assert_error(
        &d.call(
            "POST",
            "/api/vms/nope/takeover",
            "/api/vms/{name}/takeover",
            None,
        ),
        404,
        "not_found",
    );

    // A switchover needs an FT VM protected by a standby: this one is
    // unprotected, on a node without a peer.
    let refused = d.call(
        "POST",
        "/api/vms/ledger-vm/switchover",
        "/api/vms/{name}/switchover",
        None,
    );
    assert!(
        refused.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("no switchover") && m.contains("level unprotected")),
        "{refused:?}"
    );
    assert_error(&refused, 409, "conflict");
    assert_error(
        &d.call(
            "POST",
            "/api/vms/nope/switchover",
            "/api/vms/{name}/switchover",
            None,
        ),
        404,
        "not_found",
    );

    // Protect needs a peer; unprotect is accepted.
    assert_error(
        &d.call(
            "POST",
            "/api/vms/ledger-vm/protect",
            "/api/vms/{name}/protect",
            None,
        ),
        409,
        "conflict",
    );
    let ha = d.call(
        "POST",
        "/api/vms/ledger-vm/protect?level=ha",
        "/api/vms/{name}/protect",
        None,
    );
    assert_error(&ha, 409, "conflict");
    assert!(
        ha.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("level ha") && m.contains("no peer")),
        "{ha:?}"
    );
    let (status, un) = d.call(
        "POST",
        "/api/vms/ledger-vm/unprotect",
        "/api/vms/{name}/unprotect",
        None,
    );
    assert_eq!((status, &un["level"]), (200, &json!("unprotected")));

    let (status, stopped) = d.call(
        "POST",
        "/api/vms/ledger-vm/stop",
        "/api/vms/{name}/stop",
        None,
    );
    assert_eq!(status, 202, "{stopped}");
    assert_eq!(stopped["state"], "stopped");
    assert_eq!(stopped["primary_node"], Value::Null);
    assert_error(
        &d.call(
            "POST",
            "/api/vms/ledger-vm/stop",
            "/api/vms/{name}/stop",
            None,
        ),
        409,
        "conflict",
    );
    let (status, body) = d.call("DELETE", "/api/vms/ledger-vm", "/api/vms/{name}", None);
    assert_eq!((status, body), (204, Value::Null));
    assert!(vm_names(&d).is_empty());

    // The event log tells the story; the audit log has every request.
    let (_, events) = d.call("GET", "/api/events?vm=ledger-vm", "/api/events", None);
    let messages: Vec<&str> = events
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["message"].as_str().unwrap())
        .collect();
    for wanted in ["defined", "starting on node-a", "stopping", "deleted"] {
        assert!(
            messages.iter().any(|m| m.contains(wanted)),
            "{wanted}: {messages:?}"
        );
    }
    let (_, alerts) = d.call("GET", "/api/events?alerts=true", "/api/events", None);
    assert!(alerts
        .as_array()
        .unwrap()
        .iter()
        .all(|e| e["alert"] == true));
    let (_, audit) = d.call("GET", "/api/audit", "/api/audit", None);
    let actions: Vec<(String, u64)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_string(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    for wanted in [
        ("POST /api/vms".to_string(), 201),
        ("POST /api/vms/ledger-vm/start".to_string(), 202),
        ("POST /api/vms/ledger-vm/start".to_string(), 409),
        ("DELETE /api/vms/ledger-vm".to_string(), 204),
    ] {
        assert!(actions.contains(&wanted), "{wanted:?} not in {actions:?}");
    }
    check_answers_are_documented(&d);
}

fn wait_for_event(d: &Daemon, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let (_, events) = d.call("GET", "/api/events?limit=1000", "/api/events", None);
        if let Some(e) = events.as_array().unwrap().iter().find(|e| want(e)) {
            return e.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no such event in {events}; log: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn bad_requests_get_a_4xx_with_a_reason_and_change_nothing() {
    let d = Daemon::init();
    let (status, _) = d.call("POST", "/api/vms", "/api/vms", Some(vm_body(&d, "keep")));
    assert_eq!(status, 201);
    let before = d.call("GET", "/api/vms", "/api/vms", None).1;
    let events_before = d
        .call("GET", "/api/events?limit=1000", "/api/events", None)
        .1;

    let post = |body: &[u8], ct: Option<&str>| {
        d.raw(
            "POST",
            "/api/vms",
            "/api/vms",
            Some(&d.token),
            ct,
            Some(body),
        )
    };
    let json_ct = Some("application/json");
    // Malformed JSON.
    assert_error(&post(b"{\"name\": ", json_ct), 400, "bad_request");
    assert_error(&post(b"not json", json_ct), 400, "bad_request");
    // Not sent as JSON.
    assert_error(&post(b"{}", None), 415, "unsupported_media_type");
    assert_error(
        &post(b"{}", Some("text/plain")),
        415,
        "unsupported_media_type",
    );
    // ... its body unread, the connection is said to close (a client that
    // reused it raced the close).
    assert_refused_and_closed(&d, "text/plain", b"{}".to_vec(), 415);
    // Wrong types, missing and unknown fields.
    let mut wrong_type = vm_body(&d, "x");
    wrong_type["vcpus"] = json!("two");
    assert_error(
        &d.call("POST", "/api/vms", "/api/vms", Some(wrong_type)),
        422,
        "invalid_field",
    );
    let mut negative = vm_body(&d, "x");
    negative["memory_mib"] = json!(-5);
    assert_error(
        &d.call("POST", "/api/vms", "/api/vms", Some(negative)),
        422,
        "invalid_field",
    );
    assert_error(
        &d.call("POST", "/api/vms", "/api/vms", Some(json!({"name": "x"}))),
        422,
        "invalid_field",
    );
    let mut unknown = vm_body(&d, "x");
    unknown["colour"] = json!("red");
    let answer = d.call("POST", "/api/vms", "/api/vms", Some(unknown));
    assert_error(&answer, 422, "invalid_field");
    assert!(
        answer.1["message"].as_str().unwrap().contains("colour"),
        "{answer:?}"
    );
    assert_error(
        &d.call("POST", "/api/vms", "/api/vms", Some(json!([1, 2]))),
        422,
        "invalid_field",
    );
    // Checked fields: each named.
    let cases: Vec<(&str, Value, &str)> = vec![
        ("name", json!("Bad Name"), "name"),
        ("vcpus", json!(0), "vcpus"),
        ("vcpus", json!(99), "vcpus"),
        ("memory_mib", json!(1), "memory_mib"),
        ("kernel", json!("/no/such/vmlinux"), "kernel"),
        ("kernel", json!("relative/vmlinux"), "kernel"),
        ("initrd", json!("/no/such/initrd"), "initrd"),
        ("disks", json!([{}]), "disks[0]"),
        (
            "disks",
            json!([{"image": "/no/such/image"}]),
            "disks[0].image",
        ),
        ("nics", json!([{"mac": "ff:ff:ff:ff:ff:ff"}]), "nics[0].mac"),
        (
            "nics",
            json!([{"mac": "52:54:00:00:00:01"}, {"mac": "52:54:00:00:00:01"}]),
            "nics[1].mac",
        ),
        ("preferred_node", json!("node-z"), "preferred_node"),
    ];
    for (key, value, field) in cases {
        let mut body = vm_body(&d, "x");
        body[key] = value;
        let answer = d.call("POST", "/api/vms", "/api/vms", Some(body));
        assert_error(&answer, 422, "invalid_field");
        assert_eq!(answer.1["field"], field, "{answer:?}");
    }
    // A missing kernel file is named.
    let mut body = vm_body(&d, "x");
    body["kernel"] = json!("/no/such/vmlinux");
    let answer = d.call("POST", "/api/vms", "/api/vms", Some(body));
    assert!(answer.1["message"]
        .as_str()
        .unwrap()
        .contains("/no/such/vmlinux"));
    // A name in use.
    assert_error(
        &d.call("POST", "/api/vms", "/api/vms", Some(vm_body(&d, "keep"))),
        409,
        "conflict",
    );
    // Oversized body.
    let mut huge = vm_body(&d, "x");
    huge["cmdline"] = json!("a".repeat(200 << 10));
    assert_error(
        &d.call("POST", "/api/vms", "/api/vms", Some(huge)),
        413,
        "payload_too_large",
    );
    // ... and the connection, whose body was not read, is said to close
    // (a client reusing it raced the close).
    assert_refused_and_closed(&d, "application/json", vec![b' '; 300 << 10], 413);
    // Unknown names.
    for (method, path, template) in [
        ("GET", "/api/vms/nope", "/api/vms/{name}"),
        ("DELETE", "/api/vms/nope", "/api/vms/{name}"),
        ("POST", "/api/vms/nope/start", "/api/vms/{name}/start"),
        ("POST", "/api/vms/nope/stop", "/api/vms/{name}/stop"),
        (
            "POST",
            "/api/vms/nope/unprotect",
            "/api/vms/{name}/unprotect",
        ),
        ("GET", "/api/nodes/node-z", "/api/nodes/{name}"),
    ] {
        assert_error(&d.call(method, path, template, None), 404, "not_found");
    }
    // Bad queries, unknown endpoints and methods.
    let gold = d.call(
        "POST",
        "/api/vms/nope/protect?level=gold",
        "/api/vms/{name}/protect",
        None,
    );
    assert_error(&gold, 400, "bad_request");
    assert!(
        gold.1["message"]
            .as_str()
            .is_some_and(|m| m.contains("\"gold\"") && m.contains("ft or ha")),
        "{gold:?}"
    );
    // A query that does not parse gets the same JSON answer.
    assert_error(
        &d.call(
            "POST",
            "/api/vms/nope/protect?level=ha&level=ft",
            "/api/vms/{name}/protect",
            None,
        ),
        400,
        "bad_request",
    );
    assert_error(
        &d.call("GET", "/api/events?limit=0", "/api/events", None),
        400,
        "bad_request",
    );
    assert_error(
        &d.call("GET", "/api/events?limit=x", "/api/events", None),
        400,
        "bad_request",
    );
    assert_error(
        &d.call("GET", "/api/events?bogus=1", "/api/events", None),
        400,
        "bad_request",
    );
    assert_error(&d.call("GET", "/api/nothing", "-", None), 404, "not_found");
    // Maintenance: a node without a peer has nowhere to move its VMs; an
    // unknown node is not found; a node in service has no maintenance to
    // end.
    let enter = "/api/nodes/{name}/maintenance/enter";
    let exit = "/api/nodes/{name}/maintenance/exit";
    let refused = d.call("POST", "/api/nodes/node-a/maintenance/enter", enter, None);
    assert_error(&refused, 409, "conflict");
    assert!(
        refused.1["message"].as_str().unwrap().contains("no peer"),
        "{}",
        refused.1
    );
    assert_error(
        &d.call("POST", "/api/nodes/node-x/maintenance/enter", enter, None),
        404,
        "not_found",
    );
    let refused = d.call("POST", "/api/nodes/node-a/maintenance/exit", exit, None);
    assert_error(&refused, 409, "conflict");
    assert!(
        refused.1["message"]
            .as_str()
            .unwrap()
            .contains("not in maintenance"),
        "{}",
        refused.1
    );
    assert_eq!(
        d.call("GET", "/api/nodes/node-a", "/api/nodes/{name}", None)
            .1["maintenance"],
        "off"
    );
    assert_error(
        &d.call("PUT", "/api/vms", "-", None),
        405,
        "method_not_allowed",
    );

    // Nothing changed.
    assert_eq!(d.call("GET", "/api/vms", "/api/vms", None).1, before);
    let events_after = d
        .call("GET", "/api/events?limit=1000", "/api/events", None)
        .1;
    assert_eq!(events_after, events_before);
    check_answers_are_documented(&d);
}

#[test]
fn the_store_survives_a_restart() {
    let mut d = Daemon::init();
    assert_eq!(
        d.call("POST", "/api/vms", "/api/vms", Some(vm_body(&d, "one")))
            .0,
        201
    );
    assert_eq!(
        d.call("POST", "/api/vms", "/api/vms", Some(vm_body(&d, "two")))
            .0,
        201
    );
    let before = d.call("GET", "/api/vms", "/api/vms", None).1;
    let audit_before = d.call("GET", "/api/audit", "/api/audit", None).1;
    d.stop();
    d.start();
    assert_eq!(d.call("GET", "/api/vms", "/api/vms", None).1, before);
    let audit_after = d.call("GET", "/api/audit", "/api/audit", None).1;
    assert_eq!(audit_after, audit_before);
    // Slots stay unique.
    let slots: BTreeSet<u64> = before
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["definition"]["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(slots.len(), 2);
}

#[test]
fn the_event_stream_delivers_new_events() {
    let d = Daemon::init();
    let mut stream = EventStream::open(&d);
    assert_eq!(
        d.call(
            "POST",
            "/api/vms",
            "/api/vms",
            Some(vm_body(&d, "streamed"))
        )
        .0,
        201
    );
    let event = stream.next_where(Duration::from_secs(10), |e| e["vm"] == "streamed");
    assert!(event["message"].as_str().unwrap().contains("defined"));
}

#[test]
fn the_openapi_document_is_the_one_in_the_repository() {
    let d = Daemon::init();
    let (status, served) = d.raw("GET", "/api/openapi.json", "-", None, None, None);
    assert_eq!(status, 200);
    let kept_path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("openapi.json");
    let kept: Value = serde_json::from_str(
        &std::fs::read_to_string(&kept_path).expect("ftd/openapi.json is kept in the repository"),
    )
    .unwrap();
    assert!(
        served == kept,
        "the served OpenAPI document differs from {}: regenerate it with \
         `cargo run -p ftd -- openapi > ftd/openapi.json`",
        kept_path.display()
    );
    assert_eq!(
        served["openapi"].as_str().unwrap().split('.').next(),
        Some("3")
    );
    // Every $ref resolves.
    let text = served.to_string();
    for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
        let name = piece.split('"').next().unwrap();
        assert!(
            served["components"]["schemas"].get(name).is_some(),
            "unresolved $ref {name}"
        );
    }
}

#[test]
fn metrics_are_valid_prometheus_exposition() {
    let d = Daemon::init();
    assert_eq!(
        d.call("POST", "/api/vms", "/api/vms", Some(vm_body(&d, "m1")))
            .0,
        201
    );
    let mut response = d.agent.get(format!("{}/metrics", d.url)).call().unwrap();
    assert_eq!(response.status(), 200);
    let text = response.body_mut().read_to_string().unwrap();
    assert!(
        text.contains("ftvm_vm_state{vm=\"m1\",state=\"stopped\"} 1"),
        "{text}"
    );
    let promtool = which_promtool();
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn which_promtool() -> PathBuf {
    for dir in std::env::var("PATH").unwrap_or_default().split(':') {
        let p = Path::new(dir).join("promtool");
        if p.exists() {
            return p;
        }
    }
    panic!("promtool is missing: scripts/test.sh installs Debian's prometheus package");
}

/// Every answer seen was for a documented path and method, with a
/// documented status.
fn check_answers_are_documented(d: &Daemon) {
    let mut doc = String::new();
    let mut r = d
        .agent
        .get(format!("{}/api/openapi.json", d.url))
        .call()
        .unwrap();
    r.body_mut().as_reader().read_to_string(&mut doc).unwrap();
    let doc: Value = serde_json::from_str(&doc).unwrap();
    let mut documented: HashMap<(String, String), BTreeSet<u16>> = HashMap::new();
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for (method, op) in ops.as_object().unwrap() {
            let codes = op["responses"]
                .as_object()
                .unwrap()
                .keys()
                .filter_map(|k| k.parse().ok())
                .collect();
            documented.insert((method.clone(), path.clone()), codes);
        }
    }
    for (method, template, status) in d.seen.borrow().iter() {
        if template == "-" {
            continue;
        }
        let codes = documented
            .get(&(method.clone(), template.clone()))
            .unwrap_or_else(|| panic!("{method} {template} is not in the OpenAPI document"));
        assert!(
            codes.contains(status),
            "{method} {template} answered {status}, documented {codes:?}"
        );
    }
}

/// POSTs `body` as `content_type` to /api/vms: refused with `status`, and
/// the response says the connection closes (its body may be unread; a
/// client reusing it raced the close).
fn assert_refused_and_closed(d: &Daemon, content_type: &str, body: Vec<u8>, status: u16) {
    let response = d
        .agent
        .post(format!("{}/api/vms", d.url))
        .header("Authorization", format!("Bearer {}", d.token))
        .header("Content-Type", content_type)
        .send(body)
        .unwrap();
    assert_eq!(response.status().as_u16(), status);
    assert_eq!(
        response
            .headers()
            .get("connection")
            .and_then(|v| v.to_str().ok()),
        Some("close")
    );
}
