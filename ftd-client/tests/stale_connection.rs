//! A read whose pooled connection the daemon no longer knows is sent
//! again on a new connection. The server here answers one request per
//! connection with keep-alive, then resets that connection (as a daemon
//! that restarted, or a node back from a power cut, does to a stale one).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Duration;

use ftd_client::ApiClient;

fn answer_once_then_reset(mut stream: TcpStream) {
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    // The request line and headers.
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
    }
    let body = "[]";
    write!(
        stream,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    // Wait for the client's next request on this connection, then reset.
    let mut byte = [0u8; 1];
    let _ = reader.read(&mut byte);
    socket_linger_zero(&stream);
    drop(stream);
    drop(reader);
}

/// SO_LINGER 0, so that closing sends a reset.
fn socket_linger_zero(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc_linger();
    // SAFETY: a valid socket fd and a correctly sized linger struct.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            &linger as *const libc::linger as *const libc::c_void,
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
}

fn libc_linger() -> libc::linger {
    libc::linger {
        l_onoff: 1,
        l_linger: 0,
    }
}

#[test]
fn a_read_on_a_reset_pooled_connection_is_sent_again() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let mut connections = 0;
        for stream in listener.incoming().take(2) {
            connections += 1;
            answer_once_then_reset(stream.unwrap());
        }
        connections
    });
    let dir = std::env::temp_dir().join(format!("ftd-client-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let token = dir.join("token");
    std::fs::write(&token, "t0k3n-for-this-test").unwrap();
    let client = ApiClient::new(Some(&format!("http://{addr}")), Some(&token)).unwrap();
    let first: Vec<serde_json::Value> = client.vms().expect("first read");
    assert!(first.is_empty());
    std::thread::sleep(Duration::from_millis(100));
    // The pooled connection is reset by the server when this request
    // arrives; the client must not fail for it.
    let second: Vec<serde_json::Value> = client.vms().expect("second read on a new connection");
    assert!(second.is_empty());
    assert_eq!(
        server.join().unwrap(),
        2,
        "the second read used a new connection"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
