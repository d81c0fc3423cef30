//! `ftctl` printing into a pipe whose reader went away (`ftctl lab
//! ft-status | head -5`): it ends quietly, status 0 and nothing on stderr,
//! as the other tools of a pipeline end, not with a panic.

use std::process::{Command, Output, Stdio};

/// Runs ftctl with `args`, its stdout a pipe closed at the reading end
/// before it starts (so its first write fails with EPIPE).
fn into_closed_pipe(args: &[&str]) -> Output {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    Command::new(env!("CARGO_BIN_EXE_ftctl"))
        .args(args)
        .env_remove("FTCTL_API")
        .env_remove("FTCTL_TOKEN_FILE")
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .output()
        .expect("ftctl runs")
}

#[test]
fn a_lab_command_whose_reader_went_away_ends_quietly() {
    // A lab that is not up: the command only prints that it is not.
    let out = into_closed_pipe(&["lab", "--lab", "closed-stdout", "status"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(stderr.is_empty(), "stderr: {stderr}");
}
