//! Serving a control socket: each client in its own thread, at most
//! [`MAX_CLIENTS`] at once (one more gets a "busy" answer), a request of at
//! most [`MAX_REQUEST`] bytes that must arrive within [`REQUEST_TIMEOUT`],
//! an answer written within [`WRITE_TIMEOUT`]. A client that sends nothing,
//! too much or garbage gets an error answer (or, if it does not read, is
//! dropped) and delays nobody else. What a request does is the handler's.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::socket::{BoundSocket, SocketFile};
use super::{ControlRequest, ControlResponse};

/// Longest request line read (its newline excluded).
pub const MAX_REQUEST: usize = 64 << 10;
/// Clients served at once.
pub const MAX_CLIENTS: usize = 8;
/// How long a client has to send its whole request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long writing the answer may take (a client that does not read).
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything that can fail when starting to serve, by operation.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("cannot start the thread serving the control socket {path}")]
    Spawn {
        path: std::path::PathBuf,
        #[source]
        source: io::Error,
    },
}

/// A control socket being served. Dropping it stops accepting and removes
/// the socket file (clients being served finish).
#[derive(Debug)]
pub struct ControlServer {
    file: SocketFile,
    stopping: Arc<AtomicBool>,
}

impl ControlServer {
    /// Serves `socket` in a background thread, answering each request with
    /// `handler` (called from the clients' threads, possibly at once).
    pub fn start<H>(socket: BoundSocket, handler: H) -> Result<ControlServer, ServeError>
    where
        H: Fn(ControlRequest) -> ControlResponse + Send + Sync + 'static,
    {
        let BoundSocket { listener, file } = socket;
        let stopping = Arc::new(AtomicBool::new(false));
        let handler = Arc::new(handler);
        let stop = Arc::clone(&stopping);
        std::thread::Builder::new()
            .name("control".into())
            .spawn(move || accept_loop(&listener, &handler, &stop))
            .map_err(|source| ServeError::Spawn {
                path: file.path().to_path_buf(),
                source,
            })?;
        tracing::info!(path = %file.path().display(), "control socket ready");
        Ok(ControlServer { file, stopping })
    }

    pub fn path(&self) -> &Path {
        self.file.path()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        self.stopping.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees it is to stop (only through
        // our own socket, never someone else's at the path).
        if self.file.is_in_place() {
            let _ = super::socket::connect(self.file.path(), Duration::from_millis(100));
        }
    }
}

/// One of the [`MAX_CLIENTS`] places, given back when dropped.
struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    fn take(active: &Arc<AtomicUsize>) -> Option<ClientSlot> {
        active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < MAX_CLIENTS).then_some(n + 1)
            })
            .ok()
            .map(|_| ClientSlot(Arc::clone(active)))
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop<H>(listener: &std::os::unix::net::UnixListener, handler: &Arc<H>, stop: &AtomicBool)
where
    H: Fn(ControlRequest) -> ControlResponse + Send + Sync + 'static,
{
    let active = Arc::new(AtomicUsize::new(0));
    loop {
        let accepted = listener.accept();
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait, do not spin.
                warn!(error = %e, "control socket: accept failed");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let Some(slot) = ClientSlot::take(&active) else {
            warn!(
                max_clients = MAX_CLIENTS,
                "control socket: a client refused, too many at once"
            );
            let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
            let _ = write_response(
                &stream,
                &error(format!(
                    "busy: {MAX_CLIENTS} clients are being served, try again"
                )),
            );
            continue;
        };
        let handler = Arc::clone(handler);
        let spawned = std::thread::Builder::new()
            .name("control-client".into())
            .spawn(move || {
                let _slot = slot;
                serve_client(&stream, &*handler);
            });
        if let Err(e) = spawned {
            // The client sees the connection close without an answer.
            warn!(error = %e, "control socket: cannot start a client's thread");
        }
    }
}

fn error(message: impl Into<String>) -> ControlResponse {
    ControlResponse::Error {
        message: message.into(),
    }
}

/// Reads one request, answers it with `handler`.
fn serve_client<H>(stream: &UnixStream, handler: &H)
where
    H: Fn(ControlRequest) -> ControlResponse,
{
    if let Err(e) = stream.set_write_timeout(Some(WRITE_TIMEOUT)) {
        debug!(error = %e, "control client: cannot set a write timeout");
        return;
    }
    let response = match read_request(stream, MAX_REQUEST, REQUEST_TIMEOUT) {
        Ok(line) => match serde_json::from_slice::<ControlRequest>(&line) {
            Ok(request) => handler(request),
            Err(e) => error(format!("malformed request: {e}")),
        },
        Err(ReadError::TooLong) => error(format!("request longer than {MAX_REQUEST} bytes")),
        Err(ReadError::TimedOut) => error(format!(
            "no complete request line within {REQUEST_TIMEOUT:?}"
        )),
        Err(ReadError::Empty) => error("empty request"),
        Err(ReadError::Io(e)) => {
            debug!(error = %e, "control client: reading the request failed");
            return;
        }
    };
    if let ControlResponse::Error { message } = &response {
        warn!(error = %message, "control request refused");
    }
    if let Err(e) = write_response(stream, &response) {
        debug!(error = %e, "control client: writing the answer failed");
    }
}

fn write_response(mut stream: &UnixStream, response: &ControlResponse) -> io::Result<()> {
    let mut line = serde_json::to_vec(response).map_err(io::Error::other)?;
    line.push(b'\n');
    stream.write_all(&line)
}

/// Why no request line was read.
#[derive(Debug)]
enum ReadError {
    TooLong,
    TimedOut,
    /// The client closed without sending anything.
    Empty,
    Io(io::Error),
}

/// Reads one line of at most `limit` bytes (the newline, or the end of the
/// stream, ends it), all of it within `timeout`: the read timeout is set
/// to what is left before each read, so a client trickling bytes is cut
/// off too. Never holds more than `limit` plus one read's bytes.
fn read_request(
    mut stream: &UnixStream,
    limit: usize,
    timeout: Duration,
) -> Result<Vec<u8>, ReadError> {
    let deadline = Instant::now() + timeout;
    let mut line = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::TimedOut);
        }
        stream.set_read_timeout(Some(left)).map_err(ReadError::Io)?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                return Err(ReadError::TimedOut)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(ReadError::Io(e)),
        };
        if n == 0 {
            return if line.is_empty() {
                Err(ReadError::Empty)
            } else {
                Ok(line)
            };
        }
        let (part, complete) = match chunk[..n].iter().position(|&b| b == b'\n') {
            Some(end) => (&chunk[..end], true),
            None => (&chunk[..n], false),
        };
        if line.len() + part.len() > limit {
            return Err(ReadError::TooLong);
        }
        line.extend_from_slice(part);
        if complete {
            return Ok(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};

    use super::*;
    use crate::control::socket;

    /// A server on a real socket whose handler answers `pause` with
    /// `Paused { pause_us: 7 }` and anything else with `Resumed`.
    fn served(dir: &Path) -> ControlServer {
        let bound = socket::bind(&dir.join("vm.sock")).unwrap();
        ControlServer::start(bound, |request| match request {
            ControlRequest::Pause => ControlResponse::Paused { pause_us: 7 },
            _ => ControlResponse::Resumed,
        })
        .unwrap()
    }

    /// Sends `bytes` (and keeps the connection open), reads one answer
    /// line within `within`.
    fn ask(path: &Path, bytes: &[u8], within: Duration) -> io::Result<ControlResponse> {
        let mut conn = UnixStream::connect(path)?;
        conn.set_read_timeout(Some(within))?;
        // A refused client may find the connection closed before it wrote:
        // the answer is there all the same.
        let _ = conn.write_all(bytes);
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line)?;
        serde_json::from_str(&line).map_err(|e| io::Error::other(format!("{e}: {line:?}")))
    }

    fn error_of(response: io::Result<ControlResponse>) -> String {
        match response {
            Ok(ControlResponse::Error { message }) => message,
            other => panic!("not an error answer: {other:?}"),
        }
    }

    #[test]
    fn a_silent_client_delays_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let server = served(dir.path());
        // Connected, sends nothing, stays.
        let silent = UnixStream::connect(server.path()).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let start = Instant::now();
        let answer = ask(
            server.path(),
            b"{\"op\":\"pause\"}\n",
            Duration::from_secs(1),
        );
        assert_eq!(
            answer.expect("no answer while another client stays silent"),
            ControlResponse::Paused { pause_us: 7 }
        );
        assert!(start.elapsed() < Duration::from_secs(1));
        // The silent one is told why it is dropped, once its time is up.
        silent
            .set_read_timeout(Some(REQUEST_TIMEOUT + Duration::from_secs(2)))
            .unwrap();
        let mut line = String::new();
        BufReader::new(&silent).read_line(&mut line).unwrap();
        assert!(line.contains("no complete request line"), "{line:?}");
    }

    #[test]
    fn an_over_long_request_gets_an_error_answer() {
        let dir = tempfile::tempdir().unwrap();
        let server = served(dir.path());
        let mut conn = UnixStream::connect(server.path()).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        // 8 MiB without a newline, from another thread: the server must
        // stop reading at its limit and answer, not wait for a newline.
        let mut writer = conn.try_clone().unwrap();
        let flood = std::thread::spawn(move || {
            let chunk = vec![b'x'; 64 << 10];
            for _ in 0..128 {
                if writer.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut line = String::new();
        BufReader::new(&mut conn)
            .read_line(&mut line)
            .expect("no answer to an over-long request");
        let answer: ControlResponse = serde_json::from_str(&line).unwrap();
        assert_eq!(
            answer,
            ControlResponse::Error {
                message: format!("request longer than {MAX_REQUEST} bytes")
            }
        );
        drop(conn);
        flood.join().unwrap();
        // Exactly at the limit is fine (and malformed, here).
        let mut at_limit = vec![b' '; MAX_REQUEST];
        at_limit.push(b'\n');
        let e = error_of(ask(server.path(), &at_limit, Duration::from_secs(3)));
        assert!(e.starts_with("malformed request"), "{e}");
    }

    #[test]
    fn bad_requests_get_a_reason_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let server = served(dir.path());
        let within = Duration::from_secs(3);
        for (bytes, reason) in [
            (&b"not json\n"[..], "malformed request"),
            (b"{\"op\":\"explode\"}\n", "malformed request"),
            (b"[1,2]\n", "malformed request"),
            (b"\xff\xfe\n", "malformed request"),
            (
                b"{\"op\":\"capture\",\"dir\":\"/tmp/x\"}\n",
                "missing field `name`",
            ),
        ] {
            let e = error_of(ask(server.path(), bytes, within));
            assert!(e.contains(reason), "{e:?} lacks {reason:?}");
        }
        // A request ended by the end of the stream is still answered.
        let mut conn = UnixStream::connect(server.path()).unwrap();
        conn.set_read_timeout(Some(within)).unwrap();
        conn.write_all(b"{\"op\":\"pause\"}").unwrap();
        conn.shutdown(std::net::Shutdown::Write).unwrap();
        let mut line = String::new();
        BufReader::new(conn).read_line(&mut line).unwrap();
        assert!(line.contains("paused"), "{line:?}");
        // And the server still serves.
        assert_eq!(
            ask(server.path(), b"{\"op\":\"status\"}\n", within).unwrap(),
            ControlResponse::Resumed
        );
    }

    #[test]
    fn clients_beyond_the_bound_are_told_to_wait() {
        let dir = tempfile::tempdir().unwrap();
        let server = served(dir.path());
        let silent: Vec<UnixStream> = (0..MAX_CLIENTS)
            .map(|_| UnixStream::connect(server.path()).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(200));
        let e = error_of(ask(
            server.path(),
            b"{\"op\":\"pause\"}\n",
            Duration::from_secs(1),
        ));
        assert!(e.starts_with("busy"), "{e}");
        // Their places come back when they leave.
        drop(silent);
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            match ask(
                server.path(),
                b"{\"op\":\"pause\"}\n",
                Duration::from_secs(1),
            ) {
                Ok(ControlResponse::Paused { .. }) => break,
                other => assert!(Instant::now() < deadline, "still refused: {other:?}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn the_client_gives_up_on_a_server_that_does_not_answer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stalled.sock");
        // Listening (the kernel completes connections), never answering.
        let _stalled = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let start = Instant::now();
        let e = crate::control::request_within(
            &path,
            &ControlRequest::Status,
            Duration::from_millis(300),
        )
        .unwrap_err();
        assert!(
            matches!(e, crate::control::ControlError::Receive { .. }),
            "{e:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(3));
    }

    #[test]
    fn a_stopped_server_removes_its_socket() {
        let dir = tempfile::tempdir().unwrap();
        let server = served(dir.path());
        let path = server.path().to_path_buf();
        assert_eq!(
            crate::control::request_within(&path, &ControlRequest::Pause, Duration::from_secs(3))
                .unwrap(),
            ControlResponse::Paused { pause_us: 7 }
        );
        drop(server);
        assert!(!path.exists());
    }
}
