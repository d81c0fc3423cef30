//! The test daemon: the real `ftd` binary on loopback ports with its real
//! database in a temporary state directory, asked over HTTP.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub struct Daemon {
    pub dir: tempfile::TempDir,
    pub child: Option<Child>,
    pub url: String,
    pub token: String,
    pub agent: ureq::Agent,
    /// (method, path template, status) of every answer seen.
    pub seen: std::cell::RefCell<Vec<(String, String, u16)>>,
}

/// A loopback port nothing listens on now, never one handed out before in
/// this test process: ports are taken before the daemons bind them, and
/// the kernel can give a port it just took back to the next `bind(0)` (an
/// API and a pair channel once got the same port, and the daemon could
/// not listen on its pair channel).
pub fn free_port() -> u16 {
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

impl Daemon {
    pub fn init() -> Daemon {
        Daemon::init_with("node-a", free_port(), &[])
    }

    /// `ftd init --node NODE --api 127.0.0.1:PORT` with `extra` arguments.
    pub fn init_with(node: &str, port: u16, extra: &[String]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_ftd"))
            .arg("--state-dir")
            .arg(dir.path())
            .args(["init", "--node", node, "--api"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["--alink", "127.0.0.1:17800"])
            .args(extra)
            // No VM role can run on this host (see ENVIRONMENT.md); a
            // start fails visibly, which the tests check.
            .args(["--ftprotect", "/nonexistent/ftprotect"])
            .arg("--run-dir")
            .arg(dir.path().join("run"))
            .output()
            .unwrap();
        assert!(out.status.success(), "ftd init: {out:?}");
        let token = std::fs::read_to_string(dir.path().join("api-token")).unwrap();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let mut d = Daemon {
            dir,
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            token: token.trim().to_string(),
            agent,
            seen: Default::default(),
        };
        d.start();
        d
    }

    /// A daemon for a state directory made by other means (`ftd join`).
    pub fn adopt_dir(dir: tempfile::TempDir, port: u16, token: &str) -> Daemon {
        Daemon {
            dir,
            child: None,
            url: format!("http://127.0.0.1:{port}"),
            token: token.to_string(),
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(Duration::from_secs(10)))
                .build()
                .into(),
            seen: Default::default(),
        }
    }

    pub fn start(&mut self) {
        let child = Command::new(env!("CARGO_BIN_EXE_ftd"))
            .arg("--state-dir")
            .arg(self.dir.path())
            .arg("serve")
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(self.dir.path().join("ftd.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Ok(r) = self.agent.get(format!("{}/api/health", self.url)).call() {
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

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("ftd.log")).unwrap_or_default()
    }

    pub fn state_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Sends a request; returns the status and the body as JSON (Null
    /// when empty). `body` is sent as given (raw), with `content_type`.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        template: &str,
        token: Option<&str>,
        content_type: Option<&str>,
        body: Option<&[u8]>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.url);
        let mut builder = ureq::http::Request::builder().method(method).uri(&url);
        if let Some(t) = token {
            builder = builder.header("Authorization", format!("Bearer {t}"));
        }
        if let Some(ct) = content_type {
            builder = builder.header("Content-Type", ct);
        }
        let request = builder
            .body(body.map(<[u8]>::to_vec).unwrap_or_default())
            .unwrap();
        let mut response = self.agent.run(request).unwrap();
        let status = response.status().as_u16();
        let text = response.body_mut().read_to_string().unwrap_or_default();
        self.seen
            .borrow_mut()
            .push((method.to_lowercase(), template.to_string(), status));
        let value = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text).unwrap_or(Value::String(text))
        };
        (status, value)
    }

    pub fn call(
        &self,
        method: &str,
        path: &str,
        template: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let bytes = body.map(|b| serde_json::to_vec(&b).unwrap());
        self.raw(
            method,
            path,
            template,
            Some(&self.token),
            bytes.as_ref().map(|_| "application/json"),
            bytes.as_deref(),
        )
    }
}

impl Daemon {
    /// The metrics text (unauthenticated, as Prometheus scrapes it).
    pub fn metrics(&self) -> String {
        let mut response = self
            .agent
            .get(format!("{}/metrics", self.url))
            .call()
            .unwrap();
        response.body_mut().read_to_string().unwrap()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A daemon's live event stream (`GET /api/events/stream`), read as a
/// client reads it.
pub struct EventStream {
    reader: std::io::BufReader<std::net::TcpStream>,
}

impl EventStream {
    /// Subscribes to `d`'s stream (the answer's status line read).
    pub fn open(d: &Daemon) -> EventStream {
        use std::io::{BufRead, Write};
        let addr = d.url.trim_start_matches("http://").to_string();
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        write!(
            stream,
            "GET /api/events/stream HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\nAccept: text/event-stream\r\n\r\n",
            d.token
        )
        .unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut reader = std::io::BufReader::new(stream);
        let mut status_line = String::new();
        reader.read_line(&mut status_line).unwrap();
        assert!(status_line.contains("200"), "{status_line}");
        EventStream { reader }
    }

    /// The first event streamed from now on for which `want` holds,
    /// within `within`.
    pub fn next_where(&mut self, within: Duration, want: impl Fn(&Value) -> bool) -> Value {
        use std::io::BufRead;
        let deadline = Instant::now() + within;
        let mut line = String::new();
        loop {
            line.clear();
            self.reader.read_line(&mut line).unwrap();
            if let Some(data) = line.trim_end().strip_prefix("data: ") {
                let event: Value = serde_json::from_str(data).unwrap();
                if want(&event) {
                    return event;
                }
            }
            assert!(Instant::now() < deadline, "no such event in {within:?}");
        }
    }
}
