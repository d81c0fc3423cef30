//! `ftctl` printing into a pipe whose reader went away (`ftctl lab
//! ft-status | head -5`): the rest of the output is dropped and the
//! command ends with its own status, nothing on stderr; not with a panic.

use std::os::unix::net::UnixStream;
use std::process::{Command, Output, Stdio};

/// Runs ftctl with `args`, its stdout a socket whose other end is closed
/// before it starts (so its first write fails with EPIPE, as into a pipe
/// whose reader exited), its labs under `labs`.
fn into_closed_stdout(args: &[&str], labs: &std::path::Path) -> Output {
    let (stdout, reader) = UnixStream::pair().expect("a socket pair");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_ftctl"))
        .args(args)
        .env("FTLAB_DIR", labs)
        .env_remove("FTCTL_API")
        .env_remove("FTCTL_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(std::os::fd::OwnedFd::from(stdout))
        .stderr(Stdio::piped())
        .output()
        .expect("ftctl runs")
}

#[test]
fn a_lab_command_whose_reader_went_away_ends_quietly_with_its_status() {
    let labs = tempfile::tempdir().unwrap();
    // A lab that is not up: the command prints that it is not, and
    // succeeds.
    let out = into_closed_stdout(&["lab", "--lab", "closed-stdout", "status"], labs.path());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
}
