//! The agent's server side (runs inside a lab node, started by its init).

use std::io::{BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::ExitStatusExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use super::protocol::{read_message, write_message, ProtocolError, Request, Response};

/// Output kept per stream of an executed program; the rest is dropped and
/// the loss is said in the output.
const OUTPUT_CAP: usize = 16 << 20;
/// After the program exits, how long to wait for its output pipes to close
/// (a background child of it may hold them open).
const PIPE_GRACE: Duration = Duration::from_millis(500);

/// Serves clients on `port` until the process is killed.
pub fn serve(port: u16) -> std::io::Result<()> {
    serve_on(std::net::SocketAddr::from(([0, 0, 0, 0], port)))
}

/// Serves clients on `addr` until the process is killed.
pub fn serve_on(addr: std::net::SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr)?;
    tracing::info!(%addr, "lab agent listening");
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                thread::spawn(move || {
                    let peer = stream.peer_addr().ok();
                    if let Err(e) = handle(stream) {
                        tracing::warn!(?peer, error = %e, "agent connection failed");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "accept failed"),
        }
    }
    Ok(())
}

fn handle(stream: TcpStream) -> Result<(), ProtocolError> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut writer = stream;
    let request: Request = match read_message(&mut reader) {
        Ok(r) => r,
        Err(ProtocolError::Malformed(e)) => {
            let message = format!("malformed request: {e}");
            return write_message(&mut writer, &Response::Error { message });
        }
        Err(e) => return Err(e),
    };
    match request {
        Request::Ping => write_message(
            &mut writer,
            &Response::Pong {
                hostname: hostname(),
                uptime_ms: uptime_ms(),
            },
        ),
        Request::Exec { argv, timeout_ms } => {
            let response = exec(&argv, Duration::from_millis(timeout_ms));
            write_message(&mut writer, &response)
        }
        Request::Echo { len } => echo(&mut reader, &mut writer, len),
    }
}

/// Reads `len` bytes fully (checksumming them), then answers and sends them
/// back. The payload is kept in memory, so `len` is capped.
fn echo(reader: &mut impl Read, writer: &mut impl Write, len: u64) -> Result<(), ProtocolError> {
    const ECHO_CAP: u64 = 256 << 20;
    if len > ECHO_CAP {
        let message = format!("echo of {len} bytes refused: at most {ECHO_CAP}");
        return write_message(writer, &Response::Error { message });
    }
    let mut payload = vec![0u8; len as usize];
    reader.read_exact(&mut payload)?;
    let crc32 = crc32fast::hash(&payload);
    write_message(writer, &Response::Echo { bytes: len, crc32 })?;
    writer.write_all(&payload)?;
    writer.flush()?;
    Ok(())
}

/// Runs `argv` with a deadline and collects its output.
pub fn exec(argv: &[String], timeout: Duration) -> Response {
    let Some((program, args)) = argv.split_first() else {
        return Response::Error {
            message: "exec needs a program to run".into(),
        };
    };
    let mut child = match Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return Response::Error {
                message: format!("cannot run {program}: {e}"),
            }
        }
    };
    let stdout = collect(child.stdout.take());
    let stderr = collect(child.stderr.take());
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => {
                timed_out = true;
                let _ = child.kill();
                break child.wait().ok();
            }
            Ok(None) => thread::sleep(Duration::from_millis(5)),
            Err(_) => break None,
        }
    };
    let grace = Instant::now() + PIPE_GRACE;
    let stdout = stdout.finish(grace);
    let stderr = stderr.finish(grace);
    Response::Exec {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        timed_out,
        stdout,
        stderr,
    }
}

/// Output of one pipe, read by its own thread.
struct Collector {
    buf: Arc<Mutex<(Vec<u8>, bool)>>,
}

fn collect(pipe: Option<impl Read + Send + 'static>) -> Collector {
    let buf = Arc::new(Mutex::new((Vec::new(), pipe.is_none())));
    if let Some(mut pipe) = pipe {
        let shared = Arc::clone(&buf);
        thread::spawn(move || {
            let mut chunk = [0u8; 8192];
            loop {
                match pipe.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        let mut guard = shared.lock().expect("collector lock");
                        let room = OUTPUT_CAP.saturating_sub(guard.0.len());
                        guard.0.extend_from_slice(&chunk[..n.min(room)]);
                    }
                }
            }
            shared.lock().expect("collector lock").1 = true;
        });
    }
    Collector { buf }
}

impl Collector {
    /// What was read, waiting until `deadline` for the pipe to close.
    fn finish(self, deadline: Instant) -> String {
        loop {
            let guard = self.buf.lock().expect("collector lock");
            if guard.1 || Instant::now() >= deadline {
                let mut text = String::from_utf8_lossy(&guard.0).into_owned();
                if guard.0.len() >= OUTPUT_CAP {
                    text.push_str("\n[lab-agent: output truncated]\n");
                }
                return text;
            }
            drop(guard);
            thread::sleep(Duration::from_millis(5));
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
        .map(|secs| (secs * 1000.0) as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &[&str]) -> Vec<String> {
        s.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn exec_returns_code_and_output() {
        let r = exec(
            &argv(&["sh", "-c", "echo out; echo err >&2; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(
            r,
            Response::Exec {
                code: Some(3),
                signal: None,
                timed_out: false,
                stdout: "out\n".into(),
                stderr: "err\n".into()
            }
        );
    }

    #[test]
    fn exec_kills_at_the_deadline() {
        let r = exec(&argv(&["sleep", "30"]), Duration::from_millis(100));
        match r {
            Response::Exec {
                timed_out, signal, ..
            } => {
                assert!(timed_out);
                assert_eq!(signal, Some(libc::SIGKILL));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn exec_does_not_wait_for_background_children() {
        let start = Instant::now();
        let r = exec(
            &argv(&["sh", "-c", "sleep 5 & echo started"]),
            Duration::from_secs(10),
        );
        assert!(start.elapsed() < Duration::from_secs(4));
        assert!(
            matches!(r, Response::Exec { code: Some(0), ref stdout, .. } if stdout == "started\n")
        );
    }

    #[test]
    fn exec_of_missing_program_is_an_error() {
        assert!(matches!(
            exec(&argv(&["/nonexistent/prog"]), Duration::from_secs(1)),
            Response::Error { .. }
        ));
        assert!(matches!(
            exec(&[], Duration::from_secs(1)),
            Response::Error { .. }
        ));
    }
}
