//! The web console's side of `ftd`, on loopback with the real daemon: its
//! pages and their security headers, the charting library read from the
//! console_dir, the session login (a wrong token refused, the cookie
//! accepted by the API, a change without the console's header refused as
//! a cross-site request, the logout ending the session), the audit log
//! naming console users, the live stats stream of a VM, and a stream
//! opened by a console session ending at its logout.
//! The pages in a real browser are tested in the lab
//! (`tests/tests/console.rs`).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::time::Duration;

use common::{free_port, Daemon};
use serde_json::{json, Value};

/// A request with optional cookie and console header; (status, headers,
/// body text).
fn send(
    d: &Daemon,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    console: bool,
    body: Option<Value>,
) -> (u16, ureq::http::HeaderMap, String) {
    let mut builder = ureq::http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", d.url));
    if let Some(c) = cookie {
        builder = builder.header("Cookie", format!("ftd_session={c}"));
    }
    if console {
        builder = builder.header("X-Ftd-Console", "1");
    }
    let bytes = match &body {
        Some(b) => {
            builder = builder.header("Content-Type", "application/json");
            serde_json::to_vec(b).unwrap()
        }
        None => vec![],
    };
    let mut response = d.agent.run(builder.body(bytes).unwrap()).unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, headers, text)
}

fn session_id(headers: &ureq::http::HeaderMap) -> String {
    let cookie = headers
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .unwrap();
    assert!(cookie.contains("HttpOnly"), "{cookie}");
    assert!(cookie.contains("SameSite=Strict"), "{cookie}");
    cookie
        .strip_prefix("ftd_session=")
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .to_string()
}

/// `POST /api/session` with `body`, as the console sends it.
fn log_in(d: &Daemon, body: Value) -> (u16, ureq::http::HeaderMap, String) {
    send(d, "POST", "/api/session", None, true, Some(body))
}

/// Logs in with the node's token: (the session id, the session view).
fn token_session(d: &Daemon) -> (String, Value) {
    let (status, headers, text) = log_in(d, json!({"token": d.token}));
    assert_eq!(status, 200, "{text}");
    (session_id(&headers), serde_json::from_str(&text).unwrap())
}

/// Opens the event stream `path` with the header line `auth` (and
/// `Connection: close`, so that its end closes the connection); returns it
/// past its headers, read with a 10 s timeout.
fn open_stream(d: &Daemon, path: &str, auth: &str) -> BufReader<std::net::TcpStream> {
    let addr = d.url.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    reader.read_line(&mut line).unwrap();
    assert!(line.contains("200"), "{line}");
    while line != "\r\n" {
        line.clear();
        reader.read_line(&mut line).unwrap();
    }
    reader
}

#[test]
fn the_console_pages_are_served_with_their_library_and_a_strict_policy() {
    let vendor = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(vendor.path().join("vendor")).unwrap();
    std::fs::write(
        vendor.path().join("vendor/uPlot.iife.min.js"),
        "var uPlot = function(){};",
    )
    .unwrap();
    let d = Daemon::init_with(
        "node-a",
        free_port(),
        &[
            "--console-dir".to_string(),
            vendor.path().to_string_lossy().into_owned(),
        ],
    );
    // / leads to the console.
    let direct: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .build()
        .into();
    let answer = direct.get(format!("{}/", d.url)).call().unwrap();
    assert_eq!(answer.status(), 303);
    assert_eq!(answer.headers().get("location").unwrap(), "/console/");
    let (status, headers, page) = send(&d, "GET", "/console/", None, false, None);
    assert_eq!(status, 200);
    assert!(
        page.contains("<script type=\"module\" src=\"console.js\">"),
        "{page}"
    );
    let policy = headers
        .get("content-security-policy")
        .unwrap()
        .to_str()
        .unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    let (status, headers, script) = send(&d, "GET", "/console/console.js", None, false, None);
    assert_eq!(status, 200);
    assert!(headers
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .starts_with("text/javascript"));
    assert!(script.contains("/api/session"));
    // The library from the console_dir; what it lacks is a 404 that says
    // how to install it; names outside the list are not looked up.
    let (status, _, lib) = send(
        &d,
        "GET",
        "/console/vendor/uPlot.iife.min.js",
        None,
        false,
        None,
    );
    assert_eq!((status, lib.as_str()), (200, "var uPlot = function(){};"));
    let (status, _, missing) = send(
        &d,
        "GET",
        "/console/vendor/uPlot.min.css",
        None,
        false,
        None,
    );
    assert_eq!(status, 404);
    assert!(missing.contains("images/console-vendor.sh"), "{missing}");
    let (status, _, _) = send(
        &d,
        "GET",
        "/console/vendor/..%2Fapi-token",
        None,
        false,
        None,
    );
    assert_eq!(status, 404);
}

#[test]
fn a_console_session_opens_with_the_token_and_guards_changes() {
    let d = Daemon::init();
    // No session: the console is told to show its login (no error).
    let (status, _, text) = send(&d, "GET", "/api/session", None, false, None);
    assert_eq!(status, 200);
    let session: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(session["logged_in"], false);
    // A wrong token is refused; the attempt is audited.
    let (status, _, text) = log_in(&d, json!({"token": "not-the-token"}));
    assert_eq!(status, 401, "{text}");
    // A bad body is a 4xx with a reason.
    let (status, _, _) = log_in(&d, json!({"tok": 1}));
    assert_eq!(status, 422);
    // The token opens a session.
    let (id, view) = token_session(&d);
    assert_eq!(
        (view["logged_in"].clone(), view["node"].clone()),
        (json!(true), json!("node-a"))
    );
    assert!(view["expires_in_s"].as_u64().unwrap() > 60);
    // The cookie is accepted by the API...
    let (status, _, text) = send(&d, "GET", "/api/nodes", Some(&id), false, None);
    assert_eq!(status, 200, "{text}");
    let (status, _, text) = send(&d, "GET", "/api/session", Some(&id), false, None);
    assert_eq!(status, 200);
    assert_eq!(
        serde_json::from_str::<Value>(&text).unwrap()["logged_in"],
        true
    );
    // ... but a change without the console's header is a cross-site
    // request: refused, and nothing changes.
    let kernel = d.state_dir().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let body = json!({"name": "from-console", "kernel": kernel.to_string_lossy()});
    let (status, _, text) = send(&d, "POST", "/api/vms", Some(&id), false, Some(body.clone()));
    assert_eq!(status, 403, "{text}");
    assert!(
        text.contains("X-Ftd-Console") || text.contains("x-ftd-console"),
        "{text}"
    );
    assert_eq!(d.call("GET", "/api/vms", "-", None).1, json!([]));
    let (status, _, text) = send(&d, "POST", "/api/vms", Some(&id), true, Some(body));
    assert_eq!(status, 201, "{text}");
    // The audit log names the console user.
    let (_, audit) = d.call("GET", "/api/audit?limit=100", "-", None);
    let entries = audit.as_array().unwrap();
    let who = |action: &str, status: u64| {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["status"] == status)
            .map(|e| e["who"].as_str().unwrap().to_string())
            .collect::<Vec<_>>()
    };
    assert!(
        who("POST /api/vms", 201)[0].contains("(console)"),
        "{audit}"
    );
    assert!(
        who("POST /api/session", 200)[0].contains("(console login)"),
        "{audit}"
    );
    assert!(
        who("POST /api/session", 401)[0].starts_with("anonymous@"),
        "{audit}"
    );
    // Logout ends it.
    let (status, headers, _) = send(&d, "DELETE", "/api/session", Some(&id), true, None);
    assert_eq!(status, 204);
    assert!(headers
        .get("set-cookie")
        .unwrap()
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
    let (status, _, text) = send(&d, "GET", "/api/nodes", Some(&id), false, None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("session ended"), "{text}");
    // An unknown session id is no session.
    let (status, _, _) = send(&d, "GET", "/api/nodes", Some("00ff"), false, None);
    assert_eq!(status, 401);
}

#[test]
fn the_stats_stream_sends_a_sample_of_the_vm() {
    let d = Daemon::init();
    let kernel = d.state_dir().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let (status, _) = d.call(
        "POST",
        "/api/vms",
        "-",
        Some(json!({"name": "charted", "kernel": kernel.to_string_lossy()})),
    );
    assert_eq!(status, 201);
    let (status, body) = d.call("GET", "/api/vms/nope/stats", "-", None);
    assert_eq!(status, 404, "{body}");
    let auth = format!("Authorization: Bearer {}", d.token);
    let mut reader = open_stream(&d, "/api/vms/charted/stats", &auth);
    let mut line = String::new();
    let mut samples = Vec::new();
    while samples.len() < 2 {
        line.clear();
        reader.read_line(&mut line).unwrap();
        assert!(!line.is_empty(), "the stream ended");
        if let Some(data) = line.trim_end().strip_prefix("data: ") {
            samples.push(serde_json::from_str::<Value>(data).unwrap());
        }
    }
    // A stopped VM runs nowhere: no node, zero counters; one a second.
    assert_eq!(samples[0]["vm"], "charted");
    assert_eq!(samples[0]["node"], Value::Null);
    assert_eq!(samples[0]["checkpoints"], 0);
    let gap = samples[1]["unix_ms"].as_u64().unwrap() - samples[0]["unix_ms"].as_u64().unwrap();
    assert!((500..3000).contains(&gap), "{gap} ms between samples");
}

#[test]
fn console_users_log_in_with_their_password_until_deleted() {
    let d = Daemon::init();
    // Made with the token; bad names and short passwords refused.
    let (status, body) = d.call(
        "PUT",
        "/api/users/alice",
        "-",
        Some(json!({"password": "correct horse battery"})),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["name"], "alice");
    assert!(body.get("password_hash").is_none(), "{body}");
    for (path, password, field) in [
        ("/api/users/Alice", "correct horse battery", "name"),
        ("/api/users/bob", "short", "password"),
    ] {
        let (status, body) = d.call("PUT", path, "-", Some(json!({ "password": password })));
        assert_eq!(
            (status, body["field"].clone()),
            (422, json!(field)),
            "{body}"
        );
    }
    let (_, users) = d.call("GET", "/api/users", "-", None);
    assert_eq!(users.as_array().unwrap().len(), 1, "{users}");
    assert!(
        !users.to_string().contains("argon2"),
        "a hash is shown: {users}"
    );
    // The store keeps a hash, never the password.
    let db = std::fs::read(d.state_dir().join("ftd.sqlite")).unwrap();
    let text = String::from_utf8_lossy(&db);
    assert!(!text.contains("correct horse battery"));

    // A wrong password, an unknown user, or a token and a password at once
    // are refused.
    for (login, status) in [
        (
            json!({"user": "alice", "password": "wrong horse battery"}),
            401,
        ),
        (
            json!({"user": "mallory", "password": "correct horse battery"}),
            401,
        ),
        (json!({"user": "alice"}), 422),
        (
            json!({"user": "alice", "password": "correct horse battery", "token": d.token}),
            422,
        ),
    ] {
        let (got, _, text) = send(&d, "POST", "/api/session", None, true, Some(login.clone()));
        assert_eq!(got, status, "{login}: {text}");
    }
    // The password opens a session in the user's name.
    let (status, headers, text) = log_in(
        &d,
        json!({"user": "alice", "password": "correct horse battery"}),
    );
    assert_eq!(status, 200, "{text}");
    let view: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (&view["user"], &view["role"]),
        (&json!("alice"), &json!("operator"))
    );
    let id = session_id(&headers);
    // An operator: the VMs, the nodes and the logs, but not the pair
    // secret, the users, VM definitions or forced takeovers (refused, and
    // audited with who tried).
    for (method, path, body) in [
        (
            "PUT",
            "/api/users/bob",
            Some(json!({"password": "0123456789ab"})),
        ),
        ("DELETE", "/api/users/alice", None),
        ("GET", "/api/pair", None),
        ("POST", "/api/pair/peer", Some(json!({}))),
        // A definition names host files the daemon reads as root.
        (
            "POST",
            "/api/vms",
            Some(json!({"name": "x", "kernel": "/etc/shadow"})),
        ),
        ("DELETE", "/api/vms/x", None),
        ("POST", "/api/vms/x/takeover", None),
    ] {
        let (status, _, text) = send(&d, method, path, Some(&id), true, body);
        assert_eq!(status, 403, "{method} {path}: {text}");
        assert!(text.contains("alice is an operator"), "{text}");
    }
    for path in ["/api/users", "/api/nodes", "/api/audit"] {
        let (status, _, text) = send(&d, "GET", path, Some(&id), false, None);
        assert_eq!(status, 200, "{path}: {text}");
    }
    let (_, audit) = d.call("GET", "/api/audit?limit=100", "-", None);
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "GET /api/pair"
                && e["status"] == 403
                && e["who"].as_str().unwrap().starts_with("alice@")),
        "{audit}"
    );
    // The administrator (the token, here in a console session) may.
    let (admin, view) = token_session(&d);
    assert_eq!(view["role"], "administrator");
    let (status, _, text) = send(
        &d,
        "PUT",
        "/api/users/bob",
        Some(&admin),
        true,
        Some(json!({"password": "0123456789ab"})),
    );
    assert_eq!(status, 200, "{text}");
    // A new password ends the sessions opened with the old one.
    let (status, headers, _) = log_in(&d, json!({"user": "bob", "password": "0123456789ab"}));
    assert_eq!(status, 200);
    let bob = session_id(&headers);
    let (status, _) = d.call(
        "PUT",
        "/api/users/bob",
        "-",
        Some(json!({"password": "a-new-password-12"})),
    );
    assert_eq!(status, 200);
    let (status, _, text) = send(&d, "GET", "/api/nodes", Some(&bob), false, None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("new password"), "{text}");
    // The API token's name is not a user's.
    let (status, body) = d.call(
        "PUT",
        "/api/users/admin",
        "-",
        Some(json!({"password": "correct horse battery"})),
    );
    assert_eq!(
        (status, body["field"].clone()),
        (422, json!("name")),
        "{body}"
    );
    // Deleted: the next request of the session is refused, the password
    // no longer opens one.
    let (status, _) = d.call("DELETE", "/api/users/alice", "-", None);
    assert_eq!(status, 204);
    let (status, _) = d.call("DELETE", "/api/users/alice", "-", None);
    assert_eq!(status, 404);
    let (status, _, text) = send(&d, "GET", "/api/nodes", Some(&id), false, None);
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("alice was deleted"), "{text}");
    let (status, _, _) = log_in(
        &d,
        json!({"user": "alice", "password": "correct horse battery"}),
    );
    assert_eq!(status, 401);
}

#[test]
fn a_stream_opened_by_a_console_session_ends_with_the_session() {
    let d = Daemon::init();
    let (id, _) = token_session(&d);
    let mut reader = open_stream(
        &d,
        "/api/events/stream",
        &format!("Cookie: ftd_session={id}"),
    );
    let mut line = String::new();
    let (status, _, _) = send(&d, "DELETE", "/api/session", Some(&id), true, None);
    assert_eq!(status, 204);
    let logged_out = std::time::Instant::now();
    loop {
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) => panic!(
                "the stream outlived the logout by {:?}: {e}",
                logged_out.elapsed()
            ),
        }
        assert!(
            logged_out.elapsed() < Duration::from_secs(10),
            "the stream outlived the logout"
        );
    }
}
