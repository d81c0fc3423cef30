//! A blocking client of the node manager's REST API (`ftd`): where the
//! API is, its bearer token, one method per endpoint, and the live event
//! stream (server-sent events).

use std::fmt;
use std::io::{self, BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use ureq::http::{Method, Request};
use ureq::Agent;

use crate::model::ErrorBody;

/// How long a request (connecting, sending, answering) may take.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to one address may take before the next is tried
/// (a node that lost power answers nothing).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long the event stream may stay silent before it counts as dropped:
/// the daemon sends a keep-alive every 15 s.
pub const STREAM_SILENCE: Duration = Duration::from_secs(45);
/// Most events one `GET /api/events` returns.
pub const MAX_EVENTS: usize = 1000;

const NO_API: &str = "set FTCTL_API / --api; `ftctl lab env` prints them for the lab";
const NO_TOKEN: &str = "set FTCTL_TOKEN_FILE / --token-file (the node's api-token file, \
                        /var/lib/ftvm/api-token on a node); `ftctl lab env` prints them for the lab";

/// What went wrong talking to the API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Neither `--api` nor `FTCTL_API` says where the API is.
    #[error("no API address: {NO_API}")]
    NoApiAddress,
    /// The API address is not an `http://HOST:PORT` URL.
    #[error("{0:?} is not an API address (http://HOST:PORT)")]
    BadApiAddress(String),
    /// Neither `--token-file` nor `FTCTL_TOKEN_FILE` names the token.
    #[error("no API token: {NO_TOKEN}")]
    NoTokenFile,
    /// The token file cannot be read.
    #[error("cannot read the API token from {path}: {source}")]
    ReadToken { path: PathBuf, source: io::Error },
    /// The token file holds nothing.
    #[error("the API token file {0} is empty")]
    EmptyToken(PathBuf),
    /// A request body cannot be made JSON.
    #[error("cannot encode the request to {action}: {source}")]
    EncodeRequest {
        action: Action,
        source: serde_json::Error,
    },
    /// No answer: the daemon is down, the address is wrong, or the
    /// network does not get there in time.
    #[error("cannot reach the API at {url}: {source}")]
    Unreachable { url: String, source: ureq::Error },
    /// The request could not be made or the answer not read (not a
    /// question of reaching the daemon).
    #[error("{action} failed: {source}")]
    Request { action: Action, source: ureq::Error },
    /// The API refused the request and said why.
    #[error("{}{}", .body.message, .body.field.as_ref().map(|f| format!(" (field: {f})")).unwrap_or_default())]
    Refused { status: u16, body: ErrorBody },
    /// The API failed without an error body (a proxy, or not `ftd`).
    #[error("{action}: the API answered {status}: {text}")]
    UnexpectedAnswer {
        action: Action,
        status: u16,
        text: String,
    },
    /// The answer is not the JSON the API documents.
    #[error("{action}: cannot read the answer: {source}")]
    DecodeAnswer {
        action: Action,
        source: serde_json::Error,
    },
}

impl ClientError {
    /// Whether the error is the caller's configuration (no address or
    /// token): a usage error.
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            ClientError::NoApiAddress | ClientError::BadApiAddress(_) | ClientError::NoTokenFile
        )
    }

    /// Whether no answer came: the daemon is down or out of reach.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, ClientError::Unreachable { .. })
    }
}

/// A request as errors name it: method and path.
#[derive(Debug, Clone)]
pub struct Action {
    method: Method,
    path: String,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.method, self.path)
    }
}

/// Which events `GET /api/events` returns.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    /// Only this VM's.
    pub vm: Option<String>,
    /// Only alerts.
    pub alerts: bool,
    /// Only those after this id.
    pub after: Option<u64>,
    /// At most this many (the newest); the API's default when absent.
    pub limit: Option<usize>,
}

impl EventQuery {
    fn query_string(&self) -> String {
        let mut args = Vec::new();
        if let Some(vm) = &self.vm {
            args.push(format!("vm={}", encode_component(vm)));
        }
        if self.alerts {
            args.push("alerts=true".to_string());
        }
        if let Some(after) = self.after {
            args.push(format!("after={after}"));
        }
        if let Some(limit) = self.limit {
            args.push(format!("limit={limit}"));
        }
        if args.is_empty() {
            String::new()
        } else {
            format!("?{}", args.join("&"))
        }
    }
}

/// A client of the pair's API: one node's address, or both nodes'
/// (either answers for the pair; the next is tried when one cannot be
/// reached, and the one that answered is kept).
pub struct ApiClient {
    /// `http://HOST:PORT` each, without a trailing '/'.
    bases: Vec<String>,
    /// The index in `bases` of the address in use.
    current: std::sync::atomic::AtomicUsize,
    token: String,
    agent: Agent,
}

impl ApiClient {
    /// A client of the API at `api` (`http://HOST:PORT`, or `HOST:PORT`;
    /// several separated by commas: the pair's nodes, tried in turn) with
    /// the bearer token in `token_file`.
    pub fn new(api: Option<&str>, token_file: Option<&Path>) -> Result<ApiClient, ClientError> {
        let bases = api
            .ok_or(ClientError::NoApiAddress)?
            .split(',')
            .map(api_base)
            .collect::<Result<Vec<_>, _>>()?;
        let token_file = token_file.ok_or(ClientError::NoTokenFile)?;
        let token =
            std::fs::read_to_string(token_file).map_err(|source| ClientError::ReadToken {
                path: token_file.to_path_buf(),
                source,
            })?;
        let token = token.trim().to_string();
        if token.is_empty() {
            return Err(ClientError::EmptyToken(token_file.to_path_buf()));
        }
        let agent: Agent = Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(REQUEST_TIMEOUT))
            .timeout_connect(Some(CONNECT_TIMEOUT))
            .build()
            .into();
        Ok(ApiClient {
            bases,
            current: std::sync::atomic::AtomicUsize::new(0),
            token,
            agent,
        })
    }

    /// The API's address in use, as errors show it.
    pub fn base(&self) -> &str {
        let i = self.current.load(std::sync::atomic::Ordering::Relaxed);
        &self.bases[i % self.bases.len()]
    }

    /// Runs `attempt` on the address in use, then on the others in turn
    /// while the error says the address cannot be reached (for a request
    /// that is not a read, only when it never got there: the connection
    /// was refused or never made); keeps the address that answered.
    fn with_failover<T>(
        &self,
        read: bool,
        attempt: impl Fn(&str) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        use std::sync::atomic::Ordering;
        let first = self.current.load(Ordering::Relaxed);
        let mut last = None;
        for k in 0..self.bases.len() {
            let i = (first + k) % self.bases.len();
            match attempt(&self.bases[i]) {
                Err(e) if e.is_unreachable() && (read || never_connected(&e)) => last = Some(e),
                other => {
                    self.current.store(i, Ordering::Relaxed);
                    return other;
                }
            }
        }
        Err(last.expect("at least one API address"))
    }

    /// `GET /api/nodes`.
    pub fn nodes<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        self.get("/api/nodes")
    }

    /// `GET /api/nodes/{name}`.
    pub fn node<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.get(&format!("/api/nodes/{}", encode_component(name)))
    }

    /// `POST /api/nodes/{name}/maintenance/enter`: the node's VMs switch
    /// over to the peer (the answer comes at once; the node shows the
    /// progress).
    pub fn enter_maintenance<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.post_empty(&format!(
            "/api/nodes/{}/maintenance/enter",
            encode_component(name)
        ))
    }

    /// `POST /api/nodes/{name}/maintenance/exit`: the node's standbys
    /// start and the VMs that prefer it return.
    pub fn exit_maintenance<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.post_empty(&format!(
            "/api/nodes/{}/maintenance/exit",
            encode_component(name)
        ))
    }

    /// `GET /api/vms`.
    pub fn vms<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        self.get("/api/vms")
    }

    /// `GET /api/vms/{name}`.
    pub fn vm<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.get(&vm_path(name, ""))
    }

    /// `GET /api/vms/{name}/engine`: the FT engine's status of the VM's
    /// role on the node answering.
    pub fn vm_engine<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.get(&vm_path(name, "/engine"))
    }

    /// `POST /api/vms`: defines a VM from a `VmCreate` body.
    pub fn create_vm<T: DeserializeOwned>(&self, body: &impl Serialize) -> Result<T, ClientError> {
        let action = Action {
            method: Method::POST,
            path: "/api/vms".to_string(),
        };
        let bytes = serde_json::to_vec(body).map_err(|source| ClientError::EncodeRequest {
            action: action.clone(),
            source,
        })?;
        let text = self.send(&action, Some(bytes))?;
        decode(&action, &text)
    }

    /// `DELETE /api/vms/{name}`.
    pub fn delete_vm(&self, name: &str) -> Result<(), ClientError> {
        let action = Action {
            method: Method::DELETE,
            path: vm_path(name, ""),
        };
        self.send(&action, None).map(drop)
    }

    /// `GET /api/users`: the web console's users.
    pub fn users<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        self.get("/api/users")
    }

    /// `PUT /api/users/{name}`: makes a console user or gives them a new
    /// password.
    pub fn set_user<T: DeserializeOwned>(
        &self,
        name: &str,
        password: &str,
    ) -> Result<T, ClientError> {
        let action = Action {
            method: Method::PUT,
            path: format!("/api/users/{}", encode_component(name)),
        };
        let body =
            serde_json::to_vec(&serde_json::json!({ "password": password })).map_err(|source| {
                ClientError::EncodeRequest {
                    action: action.clone(),
                    source,
                }
            })?;
        let text = self.send(&action, Some(body))?;
        decode(&action, &text)
    }

    /// `DELETE /api/users/{name}`.
    pub fn delete_user(&self, name: &str) -> Result<(), ClientError> {
        let action = Action {
            method: Method::DELETE,
            path: format!("/api/users/{}", encode_component(name)),
        };
        self.send(&action, None).map(drop)
    }

    /// `POST /api/vms/{name}/start`.
    pub fn start_vm<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.post_empty(&vm_path(name, "/start"))
    }

    /// `POST /api/vms/{name}/stop`.
    pub fn stop_vm<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.post_empty(&vm_path(name, "/stop"))
    }

    /// `POST /api/vms/{name}/protect?level=LEVEL` (`ft` or `ha`).
    pub fn protect_vm<T: DeserializeOwned>(
        &self,
        name: &str,
        level: &str,
    ) -> Result<T, ClientError> {
        let tail = format!("/protect?level={}", encode_component(level));
        self.post_empty(&vm_path(name, &tail))
    }

    /// `POST /api/vms/{name}/takeover` (the operator's override of the
    /// witness).
    pub fn force_takeover<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.post_empty(&vm_path(name, "/takeover"))
    }

    /// `POST /api/vms/{name}/unprotect`.
    /// `POST /api/vms/{name}/switchover`, sent to the node that runs the
    /// VM's primary (found from the VM's record and the nodes' API
    /// addresses); to the address in use when that node is not known or
    /// its address was never reached (its answer then says why). A request
    /// that may have arrived is never sent again: a second one would move
    /// the VM back.
    pub fn switchover_vm<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        let vm: crate::model::VmView = self.vm(name)?;
        let nodes: Vec<crate::model::NodeView> = self.nodes()?;
        // `from`: asked again after an unknown outcome, a VM that moved
        // already is refused instead of moved back.
        let from = vm
            .primary_node
            .as_deref()
            .map_or(String::new(), |p| format!("?from={}", encode_component(p)));
        let action = Action {
            method: Method::POST,
            path: vm_path(name, &format!("/switchover{from}")),
        };
        let primary = vm
            .primary_node
            .as_deref()
            .and_then(|p| nodes.iter().find(|n| n.name == p))
            .and_then(|n| api_base(&n.api).ok());
        let text = match primary {
            Some(base) => match self.send_once(&base, &action, None) {
                Err(e) if never_connected(&e) => self.send(&action, None)?,
                other => other?,
            },
            None => self.send(&action, None)?,
        };
        decode(&action, &text)
    }

    pub fn unprotect_vm<T: DeserializeOwned>(&self, name: &str) -> Result<T, ClientError> {
        self.post_empty(&vm_path(name, "/unprotect"))
    }

    /// `GET /api/events`: the event log, oldest first.
    pub fn events<T: DeserializeOwned>(&self, query: &EventQuery) -> Result<T, ClientError> {
        self.get(&format!("/api/events{}", query.query_string()))
    }

    /// `GET /api/audit`: the audit log, oldest first.
    pub fn audit<T: DeserializeOwned>(&self, limit: Option<usize>) -> Result<T, ClientError> {
        match limit {
            Some(limit) => self.get(&format!("/api/audit?limit={limit}")),
            None => self.get("/api/audit"),
        }
    }

    /// `GET /api/events/stream`: events as they happen. Only connecting
    /// and the answer's head are timed; the stream itself lasts until it
    /// drops or stays silent for [`STREAM_SILENCE`].
    pub fn event_stream(&self) -> Result<EventStream, ClientError> {
        let action = Action {
            method: Method::GET,
            path: "/api/events/stream".to_string(),
        };
        let mut response = self.with_failover(true, |base| {
            self.agent
                .get(format!("{base}{}", action.path))
                .header("Authorization", format!("Bearer {}", self.token))
                .header("Accept", "text/event-stream")
                .config()
                .timeout_global(None)
                .timeout_connect(Some(CONNECT_TIMEOUT))
                .timeout_recv_response(Some(REQUEST_TIMEOUT))
                .timeout_per_read(Some(STREAM_SILENCE))
                .build()
                .call()
                .map_err(|e| transport_error(base, &action, e))
        })?;
        let status = response.status().as_u16();
        if !response.status().is_success() {
            let text = response.body_mut().read_to_string().unwrap_or_default();
            return Err(refusal(&action, status, text));
        }
        Ok(EventStream::new(BufReader::new(
            response.into_body().into_reader(),
        )))
    }

    /// `GET /metrics`: the Prometheus exposition text.
    pub fn metrics(&self) -> Result<String, ClientError> {
        let action = Action {
            method: Method::GET,
            path: "/metrics".to_string(),
        };
        self.send(&action, None)
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let action = Action {
            method: Method::GET,
            path: path.to_string(),
        };
        let text = self.send(&action, None)?;
        decode(&action, &text)
    }

    fn post_empty<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let action = Action {
            method: Method::POST,
            path: path.to_string(),
        };
        let text = self.send(&action, None)?;
        decode(&action, &text)
    }

    /// Sends a request (with a JSON body when given); returns the body of
    /// a 2xx answer, or the API's refusal. A read (GET) whose pooled
    /// connection the daemon no longer knows (it restarted, or its node
    /// came back from a power cut) and answers with a reset is sent once
    /// more on a new connection; other requests are not repeated (the
    /// first may have been carried out).
    fn send(&self, action: &Action, json: Option<Vec<u8>>) -> Result<String, ClientError> {
        let read = action.method == Method::GET;
        self.with_failover(read, |base| {
            match self.send_once(base, action, json.clone()) {
                Err(ClientError::Unreachable {
                    source: ureq::Error::Io(ref e),
                    ..
                }) if read && stale_connection(e) => self.send_once(base, action, json.clone()),
                other => other,
            }
        })
    }

    fn send_once(
        &self,
        base: &str,
        action: &Action,
        json: Option<Vec<u8>>,
    ) -> Result<String, ClientError> {
        let mut builder = Request::builder()
            .method(action.method.clone())
            .uri(format!("{base}{}", action.path))
            .header("Authorization", format!("Bearer {}", self.token))
            .header("Accept", "application/json");
        if json.is_some() {
            builder = builder.header("Content-Type", "application/json");
        }
        let request = builder
            .body(json.unwrap_or_default())
            .map_err(|e| ClientError::Request {
                action: action.clone(),
                source: ureq::Error::Http(e),
            })?;
        let mut response = self
            .agent
            .run(request)
            .map_err(|e| transport_error(base, action, e))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| transport_error(base, action, e))?;
        if response.status().is_success() {
            Ok(text)
        } else {
            Err(refusal(action, status, text))
        }
    }
}

/// Sorts a failed exchange with `base`: no answer at all (connection
/// refused, timed out, host unknown) is [`ClientError::Unreachable`].
fn transport_error(base: &str, action: &Action, source: ureq::Error) -> ClientError {
    match source {
        ureq::Error::Io(_)
        | ureq::Error::Timeout(_)
        | ureq::Error::HostNotFound
        | ureq::Error::ConnectionFailed => ClientError::Unreachable {
            url: base.to_string(),
            source,
        },
        source => ClientError::Request {
            action: action.clone(),
            source,
        },
    }
}

/// Whether a request surely never reached the daemon (so that sending it
/// to the other node cannot do it twice).
fn never_connected(e: &ClientError) -> bool {
    match e {
        ClientError::Unreachable { source, .. } => match source {
            ureq::Error::HostNotFound | ureq::Error::ConnectionFailed => true,
            ureq::Error::Timeout(t) => matches!(t, ureq::Timeout::Connect | ureq::Timeout::Resolve),
            ureq::Error::Io(io) => matches!(
                io.kind(),
                io::ErrorKind::ConnectionRefused
                    | io::ErrorKind::HostUnreachable
                    | io::ErrorKind::NetworkUnreachable
            ),
            _ => false,
        },
        _ => false,
    }
}

/// An error that a reused connection gives when its other end is gone.
fn stale_connection(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::UnexpectedEof
    )
}

/// An error answer: the API's [`ErrorBody`] when it sent one.
fn refusal(action: &Action, status: u16, text: String) -> ClientError {
    match serde_json::from_str::<ErrorBody>(&text) {
        Ok(body) => ClientError::Refused { status, body },
        Err(_) => ClientError::UnexpectedAnswer {
            action: action.clone(),
            status,
            text: text.trim().chars().take(200).collect(),
        },
    }
}

fn decode<T: DeserializeOwned>(action: &Action, text: &str) -> Result<T, ClientError> {
    serde_json::from_str(text).map_err(|source| ClientError::DecodeAnswer {
        action: action.clone(),
        source,
    })
}

/// `http://HOST:PORT` from what the user gave (a bare `HOST:PORT` is
/// taken as http; the API is plain HTTP on the management network).
fn api_base(api: &str) -> Result<String, ClientError> {
    let api = api.trim();
    let base = if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    };
    let base = base.trim_end_matches('/').to_string();
    let authority = base
        .strip_prefix("http://")
        .ok_or_else(|| ClientError::BadApiAddress(api.to_string()))?;
    let plausible = !authority.is_empty()
        && !authority.contains('/')
        && !authority.chars().any(char::is_whitespace);
    if plausible {
        Ok(base)
    } else {
        Err(ClientError::BadApiAddress(api.to_string()))
    }
}

fn vm_path(name: &str, tail: &str) -> String {
    format!("/api/vms/{}{tail}", encode_component(name))
}

/// Percent-encodes everything in a path segment or query value but
/// RFC 3986's unreserved characters.
fn encode_component(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SseMessage {
    /// Its type (`event`, `alert`, `lagged`; `message` when unnamed).
    pub event: String,
    pub id: Option<String>,
    /// Its data lines, joined by '\n'.
    pub data: String,
}

/// Reads server-sent events from a stream of lines.
pub struct SseReader<R> {
    lines: R,
}

impl<R: BufRead> SseReader<R> {
    pub fn new(lines: R) -> SseReader<R> {
        SseReader { lines }
    }

    /// The next event; `None` when the stream ends (an event cut off by
    /// the end is dropped, as the SSE specification says).
    pub fn next_message(&mut self) -> io::Result<Option<SseMessage>> {
        let mut event = None;
        let mut id = None;
        let mut data: Option<String> = None;
        let mut line = String::new();
        loop {
            line.clear();
            if self.lines.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let line = line.trim_end_matches(['\r', '\n']);
            if line.is_empty() {
                match data.take() {
                    Some(data) => {
                        return Ok(Some(SseMessage {
                            event: event.take().unwrap_or_else(|| "message".to_string()),
                            id: id.take(),
                            data,
                        }))
                    }
                    None => {
                        event = None;
                        continue;
                    }
                }
            }
            if line.starts_with(':') {
                continue; // a comment: the keep-alive
            }
            let (field, value) = match line.split_once(':') {
                Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
                None => (line, ""),
            };
            match field {
                "event" => event = Some(value.to_string()),
                "id" => id = Some(value.to_string()),
                "data" => match &mut data {
                    Some(d) => {
                        d.push('\n');
                        d.push_str(value);
                    }
                    None => data = Some(value.to_string()),
                },
                _ => {}
            }
        }
    }
}

/// The live event stream of `GET /api/events/stream`.
pub type EventStream = SseReader<BufReader<ureq::BodyReader<'static>>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_sent_events_are_parsed() {
        let text = ": keep-alive\n\nid: 7\nevent: alert\ndata: {\"a\":1}\n\n\
                    event: lagged\ndata: line one\ndata:line two\r\n\r\n\
                    data: cut off";
        let mut reader = SseReader::new(text.as_bytes());
        assert_eq!(
            reader.next_message().unwrap(),
            Some(SseMessage {
                event: "alert".into(),
                id: Some("7".into()),
                data: "{\"a\":1}".into(),
            })
        );
        assert_eq!(
            reader.next_message().unwrap(),
            Some(SseMessage {
                event: "lagged".into(),
                id: None,
                data: "line one\nline two".into(),
            })
        );
        assert_eq!(reader.next_message().unwrap(), None);
    }

    #[test]
    fn api_addresses_are_checked() {
        assert_eq!(api_base("127.0.0.1:8080").unwrap(), "http://127.0.0.1:8080");
        assert_eq!(
            api_base("http://node-a:8080/").unwrap(),
            "http://node-a:8080"
        );
        for bad in ["https://node-a", "http://", "http://a/b", "ftp://a", ""] {
            assert!(
                matches!(api_base(bad), Err(ClientError::BadApiAddress(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(encode_component("ledger-vm"), "ledger-vm");
        assert_eq!(encode_component("a b/c?"), "a%20b%2Fc%3F");
        let query = EventQuery {
            vm: Some("x&y".into()),
            alerts: true,
            after: Some(4),
            limit: Some(10),
        };
        assert_eq!(
            query.query_string(),
            "?vm=x%26y&alerts=true&after=4&limit=10"
        );
        assert_eq!(EventQuery::default().query_string(), "");
    }

    #[test]
    fn refusals_carry_the_api_message_and_field() {
        let action = Action {
            method: Method::POST,
            path: "/api/vms".into(),
        };
        let e = refusal(
            &action,
            422,
            r#"{"error":"invalid_field","message":"kernel: not absolute","field":"kernel"}"#.into(),
        );
        assert_eq!(e.to_string(), "kernel: not absolute (field: kernel)");
        let e = refusal(&action, 502, "<html>bad gateway</html>".into());
        assert_eq!(
            e.to_string(),
            "POST /api/vms: the API answered 502: <html>bad gateway</html>"
        );
    }
}
