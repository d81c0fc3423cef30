//! [`LinkListener`]: waits for A-link connections and runs each one's
//! handshake in a task of its own.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, ToSocketAddrs};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::warn;

use super::{Link, LinkConfig, LinkError};
use crate::auth::Side;

/// How many handshakes a listener runs at once; connections beyond are
/// closed at once (a flood must not pile up tasks).
pub const MAX_PENDING_HANDSHAKES: usize = 32;

/// Waits for A-link connections. Each connection's handshake runs in a
/// task of its own (bounded by the handshake timeout), so a connection
/// that stalls holds up only itself, never the next one: anything that
/// reaches the port could otherwise keep the primary out.
pub struct LinkListener {
    local: SocketAddr,
    results: Mutex<tokio::sync::mpsc::Receiver<Result<Link, LinkError>>>,
    acceptor: JoinHandle<()>,
}

impl LinkListener {
    pub async fn bind(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        config: LinkConfig,
    ) -> Result<LinkListener, LinkError> {
        let shown = format!("{addr:?}");
        let bind_err = |source| LinkError::Bind {
            addr: shown.clone(),
            source,
        };
        let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let (tx, results) = tokio::sync::mpsc::channel(MAX_PENDING_HANDSHAKES);
        let acceptor = tokio::spawn(accept_connections(listener, config, tx));
        Ok(LinkListener {
            local,
            results: Mutex::new(results),
            acceptor,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, LinkError> {
        Ok(self.local)
    }

    /// The next connection whose handshake ended: the link, or why the
    /// handshake failed.
    pub async fn accept(&self) -> Result<Link, LinkError> {
        match self.results.lock().await.recv().await {
            Some(result) => result,
            None => Err(LinkError::Accept {
                source: std::io::Error::other("the listener stopped"),
            }),
        }
    }
}

impl Drop for LinkListener {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

/// Accepts connections and runs each one's handshake in its own task.
async fn accept_connections(
    listener: TcpListener,
    config: LinkConfig,
    results: tokio::sync::mpsc::Sender<Result<Link, LinkError>>,
) {
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(source) => {
                if results
                    .send(Err(LinkError::Accept { source }))
                    .await
                    .is_err()
                {
                    return;
                }
                // E.g. out of file descriptors: do not spin.
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Ok(permit) = Arc::clone(&pending).try_acquire_owned() else {
            warn!(%from, "too many A-link handshakes under way: connection closed");
            continue;
        };
        let (results, config) = (results.clone(), config.clone());
        tokio::spawn(async move {
            let result = Link::establish(stream, Side::Accepting, &config).await;
            drop(permit);
            let _ = results.send(result).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use tokio::net::TcpStream;

    use super::*;
    use crate::hello::Role;
    use crate::link::tests::{config, SECRET, WITHIN};

    /// Issue 9, defect 6: a connection that stalls in its handshake (any
    /// host that reaches the port can make one) held the listener for the
    /// whole handshake timeout, longer than a primary waits to connect (it
    /// failed before: the primary's connect timed out).
    #[tokio::test]
    async fn a_stalled_connection_does_not_hold_up_the_next() {
        let mut b = config("node-b", Role::Standby, SECRET);
        b.handshake_timeout = Duration::from_secs(3);
        let listener = LinkListener::bind("127.0.0.1:0", b).await.unwrap();
        let addr = listener.local_addr().unwrap();
        // Two stalled connections: connected, silent, held open.
        let _stalled: Vec<TcpStream> = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        let accepting = tokio::spawn(async move {
            let link = listener.accept().await;
            (link, listener)
        });
        let a = config("node-a", Role::Primary, SECRET);
        let started = std::time::Instant::now();
        let connected = tokio::time::timeout(Duration::from_secs(1), Link::connect(addr, &a))
            .await
            .expect("the primary got through in well under the handshake timeout")
            .expect("handshake");
        assert!(started.elapsed() < Duration::from_secs(1));
        let (accepted, _listener) = tokio::time::timeout(WITHIN, accepting)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            accepted
                .expect("the listener hands over the good link")
                .peer_hello()
                .node_name,
            "node-a"
        );
        drop(connected);
    }
}
