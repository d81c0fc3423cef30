//! The client side of the agent protocol (used by `ftctl` on the outer host
//! and by `lab-agent send` inside a node).

use std::io::{BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::pattern::Pattern;
use super::protocol::{read_message, write_message, ProtocolError, Request, Response};

/// Errors of talking to an agent, one per operation.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent at {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("agent at {addr}: {source}")]
    Protocol {
        addr: SocketAddr,
        #[source]
        source: ProtocolError,
    },
    #[error("agent at {addr} refused the request: {message}")]
    Refused { addr: SocketAddr, message: String },
    #[error("agent at {addr} gave an answer of the wrong kind: {answer:?}")]
    WrongAnswer {
        addr: SocketAddr,
        answer: Box<Response>,
    },
    #[error("echo through {addr} came back damaged: sent {sent} bytes crc {sent_crc:08x}, agent saw {seen} bytes crc {seen_crc:08x}, returned crc {returned_crc:08x}")]
    EchoMismatch {
        addr: SocketAddr,
        sent: u64,
        sent_crc: u32,
        seen: u64,
        seen_crc: u32,
        returned_crc: u32,
    },
}

/// The result of a command run by an agent.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecOutput {
    pub code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    pub stdout: String,
    pub stderr: String,
}

impl ExecOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// An exit code for a CLI that passes this command's status on.
    pub fn exit_code(&self) -> i32 {
        match (self.code, self.signal) {
            (Some(c), _) => c,
            (None, Some(s)) => 128 + s,
            (None, None) => 255,
        }
    }
}

/// A verified round trip of a payload through an agent.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EchoReport {
    pub bytes: u64,
    pub crc32: u32,
    pub elapsed_ms: f64,
    /// Payload bytes moved per second, counting both directions.
    pub mbytes_per_sec: f64,
}

/// A client of one agent.
#[derive(Debug, Clone)]
pub struct AgentClient {
    addr: SocketAddr,
    connect_timeout: Duration,
}

impl AgentClient {
    pub fn new(addr: SocketAddr) -> Self {
        AgentClient {
            addr,
            connect_timeout: Duration::from_secs(3),
        }
    }

    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn connect(&self, io_timeout: Duration) -> Result<TcpStream, AgentError> {
        let connect_err = |source| AgentError::Connect {
            addr: self.addr,
            source,
        };
        let stream =
            TcpStream::connect_timeout(&self.addr, self.connect_timeout).map_err(connect_err)?;
        stream
            .set_read_timeout(Some(io_timeout))
            .map_err(connect_err)?;
        stream
            .set_write_timeout(Some(io_timeout))
            .map_err(connect_err)?;
        stream.set_nodelay(true).map_err(connect_err)?;
        Ok(stream)
    }

    fn proto(&self, source: impl Into<ProtocolError>) -> AgentError {
        AgentError::Protocol {
            addr: self.addr,
            source: source.into(),
        }
    }

    fn round_trip(&self, request: &Request, io_timeout: Duration) -> Result<Response, AgentError> {
        let mut stream = self.connect(io_timeout)?;
        write_message(&mut stream, request).map_err(|e| self.proto(e))?;
        let mut reader = BufReader::new(stream);
        self.expect_ok(read_message(&mut reader).map_err(|e| self.proto(e))?)
    }

    fn expect_ok(&self, response: Response) -> Result<Response, AgentError> {
        match response {
            Response::Error { message } => Err(AgentError::Refused {
                addr: self.addr,
                message,
            }),
            other => Ok(other),
        }
    }

    fn wrong(&self, answer: Response) -> AgentError {
        AgentError::WrongAnswer {
            addr: self.addr,
            answer: Box::new(answer),
        }
    }

    /// Returns the node's hostname and uptime.
    pub fn ping(&self) -> Result<(String, Duration), AgentError> {
        match self.round_trip(&Request::Ping, Duration::from_secs(5))? {
            Response::Pong {
                hostname,
                uptime_ms,
            } => Ok((hostname, Duration::from_millis(uptime_ms))),
            other => Err(self.wrong(other)),
        }
    }

    /// Runs `argv` in the node (no shell: pass `sh -c` yourself).
    pub fn exec<S: AsRef<str>>(
        &self,
        argv: &[S],
        timeout: Duration,
    ) -> Result<ExecOutput, AgentError> {
        let request = Request::Exec {
            argv: argv.iter().map(|s| s.as_ref().to_string()).collect(),
            timeout_ms: timeout.as_millis() as u64,
        };
        match self.round_trip(&request, timeout + Duration::from_secs(10))? {
            Response::Exec {
                code,
                signal,
                timed_out,
                stdout,
                stderr,
            } => Ok(ExecOutput {
                code,
                signal,
                timed_out,
                stdout,
                stderr,
            }),
            other => Err(self.wrong(other)),
        }
    }

    /// Sends `len` bytes of the pattern `seed` through the agent and back,
    /// and checks that both the agent and this side saw the same bytes.
    pub fn echo(&self, len: u64, seed: u64, timeout: Duration) -> Result<EchoReport, AgentError> {
        let start = Instant::now();
        let mut stream = self.connect(timeout)?;
        write_message(&mut stream, &Request::Echo { len }).map_err(|e| self.proto(e))?;
        let mut sent_crc = crc32fast::Hasher::new();
        let mut pattern = Pattern::new(seed);
        let mut chunk = vec![0u8; 64 << 10];
        let mut left = len;
        // The agent reads the whole payload before it answers, so writing all
        // of it first cannot deadlock.
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            pattern.fill(&mut chunk[..n]);
            sent_crc.update(&chunk[..n]);
            stream.write_all(&chunk[..n]).map_err(|e| self.proto(e))?;
            left -= n as u64;
        }
        let sent_crc = sent_crc.finalize();
        let mut reader = BufReader::new(stream);
        let (seen, seen_crc) =
            match self.expect_ok(read_message(&mut reader).map_err(|e| self.proto(e))?)? {
                Response::Echo { bytes, crc32 } => (bytes, crc32),
                other => return Err(self.wrong(other)),
            };
        let mut returned = crc32fast::Hasher::new();
        let mut left = seen;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            reader
                .read_exact(&mut chunk[..n])
                .map_err(|e| self.proto(e))?;
            returned.update(&chunk[..n]);
            left -= n as u64;
        }
        let returned_crc = returned.finalize();
        if seen != len || seen_crc != sent_crc || returned_crc != sent_crc {
            return Err(AgentError::EchoMismatch {
                addr: self.addr,
                sent: len,
                sent_crc,
                seen,
                seen_crc,
                returned_crc,
            });
        }
        let elapsed = start.elapsed().as_secs_f64();
        Ok(EchoReport {
            bytes: len,
            crc32: sent_crc,
            elapsed_ms: elapsed * 1e3,
            mbytes_per_sec: 2.0 * len as f64 / elapsed.max(1e-9) / 1e6,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A real agent server on loopback.
    fn agent() -> AgentClient {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        std::thread::spawn(move || super::super::server::serve_on(addr));
        let client = AgentClient::new(addr);
        let deadline = Instant::now() + Duration::from_secs(10);
        while client.ping().is_err() {
            assert!(Instant::now() < deadline, "agent did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        client
    }

    #[test]
    fn exec_and_echo_through_a_real_agent() {
        let client = agent();
        let out = client
            .exec(&["sh", "-c", "echo hi; exit 4"], Duration::from_secs(10))
            .unwrap();
        assert_eq!(out.stdout, "hi\n");
        assert_eq!(out.exit_code(), 4);
        let report = client.echo(3_000_001, 42, Duration::from_secs(20)).unwrap();
        assert_eq!(report.bytes, 3_000_001);
        let empty = client.echo(0, 1, Duration::from_secs(5)).unwrap();
        assert_eq!(empty.crc32, crc32fast::hash(&[]));
    }

    #[test]
    fn refusals_and_dead_agents_are_clear_errors() {
        let client = agent();
        assert!(matches!(
            client.echo(1 << 40, 1, Duration::from_secs(5)),
            Err(AgentError::Refused { .. }) | Err(AgentError::Protocol { .. })
        ));
        let exec = client.exec::<&str>(&[], Duration::from_secs(1));
        assert!(matches!(exec, Err(AgentError::Refused { .. })));
        // Nothing listens on port 1 of loopback.
        let dead = AgentClient::new("127.0.0.1:1".parse().unwrap());
        assert!(matches!(dead.ping(), Err(AgentError::Connect { .. })));
    }
}
