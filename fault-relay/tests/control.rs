//! `ftrelay`'s control socket: its owner's only, one command per line, one
//! answer per line, a stale socket replaced and a live one left alone.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use fault_relay::control::{send_command, ControlSocket};
use fault_relay::{ControlError, Relay};

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("ftrelay-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[tokio::test]
async fn the_control_socket_drives_the_relay() {
    let dir = TempDir::new("control");
    let path = dir.0.join("relay.sock");
    // A stale socket (its server gone) is replaced.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let relay = Relay::start("127.0.0.1:0", "127.0.0.1:9").await.unwrap();
    let control = ControlSocket::bind(&path).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let serving = tokio::spawn(control.serve(relay.handle().clone()));

    let ask = |line: &'static str| {
        let path = path.clone();
        async move { send_command(&path, line).await.unwrap() }
    };
    assert_eq!(ask("up drop on EpochEnd").await, "ok up drop on EpochEnd");
    assert_eq!(ask("down flip 12").await, "ok down flip byte 12 by 0x01");
    assert_eq!(ask("up delay 50ms").await, "ok up delay 50ms");
    assert_eq!(ask("both stall").await, "ok both stall");
    let counters = ask("counters").await;
    for word in [
        "up.pending=1",
        "down.pending=1",
        "up.delay_ms=50",
        "down.delay_ms=0",
        "up.stalled=true",
        "down.stalled=true",
        "connections=0",
    ] {
        assert!(
            counters.split_whitespace().any(|w| w == word),
            "{word} in {counters}"
        );
    }
    assert_eq!(ask("resume").await, "ok both resume");
    assert!(!relay.handle().counters().up.stalled);
    assert!(ask("up explode")
        .await
        .starts_with("error: unknown command"));
    assert!(ask("up delay 5 on Pages")
        .await
        .starts_with("error: delay takes no frame kind"));
    assert_eq!(ask("clear").await, "ok cleared");
    assert_eq!(relay.handle().counters().up.pending, 0);

    // A live socket is left alone.
    assert!(matches!(
        ControlSocket::bind(&path),
        Err(ControlError::InUse { .. })
    ));
    serving.abort();
    let _ = serving.await;
    assert!(!path.exists(), "the socket file goes with its server");
}
