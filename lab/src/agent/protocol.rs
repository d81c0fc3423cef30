//! Messages between the agent and its clients.

use std::io::{BufRead, Write};

use serde::{Deserialize, Serialize};

/// Longest request or response line accepted (outputs are capped below it).
pub const MAX_LINE: usize = 64 << 20;

/// A client's request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Is the agent up? Answered with [`Response::Pong`].
    Ping,
    /// Run `argv` (no shell) and return its exit status and output.
    Exec { argv: Vec<String>, timeout_ms: u64 },
    /// `len` raw bytes follow; the agent counts them, checksums them and sends
    /// them back, so both directions of a link carry the payload.
    Echo { len: u64 },
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Pong {
        hostname: String,
        uptime_ms: u64,
    },
    Exec {
        /// Exit code, if the program exited.
        code: Option<i32>,
        /// Signal number, if a signal ended it.
        signal: Option<i32>,
        timed_out: bool,
        stdout: String,
        stderr: String,
    },
    /// Sent before the echoed payload.
    Echo {
        bytes: u64,
        crc32: u32,
    },
    Error {
        message: String,
    },
}

/// Errors of reading or writing a message.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("connection closed before a message arrived")]
    Closed,
    #[error("I/O error on the agent connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("message line longer than {MAX_LINE} bytes")]
    TooLong,
    #[error("malformed message: {0}")]
    Malformed(#[from] serde_json::Error),
}

/// Writes `msg` as one JSON line.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), ProtocolError> {
    let mut line = serde_json::to_vec(msg)?;
    line.push(b'\n');
    w.write_all(&line)?;
    w.flush()?;
    Ok(())
}

/// Reads one JSON line (at most [`MAX_LINE`] bytes).
pub fn read_message<T: for<'de> Deserialize<'de>, R: BufRead>(
    r: &mut R,
) -> Result<T, ProtocolError> {
    let mut line = Vec::new();
    let n = std::io::Read::take(r, MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(ProtocolError::Closed);
    }
    if line.len() > MAX_LINE {
        return Err(ProtocolError::TooLong);
    }
    Ok(serde_json::from_slice(&line)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip() {
        let reqs = [
            Request::Ping,
            Request::Exec {
                argv: vec!["sh".into(), "-c".into(), "echo 'a\nb'".into()],
                timeout_ms: 5,
            },
            Request::Echo { len: 7 },
        ];
        let mut buf = Vec::new();
        for r in &reqs {
            write_message(&mut buf, r).unwrap();
        }
        let mut rd = std::io::Cursor::new(buf);
        for r in &reqs {
            assert_eq!(&read_message::<Request, _>(&mut rd).unwrap(), r);
        }
        assert!(matches!(
            read_message::<Request, _>(&mut rd),
            Err(ProtocolError::Closed)
        ));
    }

    #[test]
    fn malformed_lines_are_errors() {
        let mut rd = std::io::Cursor::new(b"{\"op\":\"format_disk\"}\n".to_vec());
        assert!(matches!(
            read_message::<Request, _>(&mut rd),
            Err(ProtocolError::Malformed(_))
        ));
        let mut rd = std::io::Cursor::new(b"not json\n".to_vec());
        assert!(matches!(
            read_message::<Request, _>(&mut rd),
            Err(ProtocolError::Malformed(_))
        ));
    }
}
