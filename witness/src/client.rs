//! Asking the witness: one connection kept open (so the witness hears this
//! node between requests too), requests matched to answers by id,
//! reconnection on the next request after any failure, several witness
//! addresses tried in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ft_link::{Link, LinkConfig, LinkSender, PairSecret};
use tokio::sync::oneshot;
use tracing::{debug, info};

use crate::protocol::{client_hello, Answer, ProtocolError, Request};
use crate::server::CONNECTION_TIMEOUT;

#[derive(Debug, thiserror::Error)]
pub enum WitnessError {
    #[error("no witness address is configured")]
    NoAddress,
    #[error("cannot reach the witness: {0}")]
    Unreachable(String),
    #[error("the witness did not answer within {0:?}")]
    NoAnswer(Duration),
    #[error("the connection to the witness failed: {0}")]
    Lost(String),
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Answer>>>>;

struct Connection {
    tx: LinkSender,
    pending: Pending,
    reader: tokio::task::JoinHandle<()>,
    /// Set when a request on it went unanswered (a dead connection as far
    /// as this client can tell): the next request opens a new one.
    failed: AtomicBool,
}

impl Connection {
    fn usable(&self) -> bool {
        !self.reader.is_finished() && !self.failed.load(Ordering::Acquire)
    }
}

/// One request waiting for its answer. Dropped before the answer came (its
/// caller gave up, a timeout around `ask` included), it forgets the request
/// and, unless it was a claim (a slow answer to a claim is normal), marks
/// the connection failed, as an answer timeout inside `ask` does.
struct Asking<'a> {
    connection: &'a Connection,
    id: u64,
    claim: bool,
    answered: bool,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        if self.answered {
            return;
        }
        lock(&self.connection.pending).remove(&self.id);
        if !self.claim {
            self.connection.failed.store(true, Ordering::Release);
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A node's handle on the witness (cheap to share behind an `Arc`).
pub struct WitnessClient {
    addrs: Vec<String>,
    /// The node this client speaks for.
    node: String,
    link: LinkConfig,
    answer_within: Duration,
    connection: tokio::sync::Mutex<Option<Arc<Connection>>>,
    ids: AtomicU64,
}

/// How long one connection attempt may take.
const CONNECT_WITHIN: Duration = Duration::from_secs(1);

impl WitnessClient {
    /// `addrs`: the witness's addresses (host:port), tried in order.
    /// `answer_within`: how long a request (a claim included) may take.
    pub fn new(
        addrs: Vec<String>,
        secret: PairSecret,
        node: &str,
        answer_within: Duration,
    ) -> WitnessClient {
        let link =
            LinkConfig::new(secret, client_hello(node)).with_heartbeat_timeout(CONNECTION_TIMEOUT);
        WitnessClient {
            addrs,
            node: node.to_string(),
            link,
            answer_within,
            connection: tokio::sync::Mutex::new(None),
            ids: AtomicU64::new(1),
        }
    }

    pub fn addrs(&self) -> &[String] {
        &self.addrs
    }

    /// The node this client speaks for.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Opens the connection ahead of the first request (a standby does, so
    /// that its claim at a takeover waits for no connection and handshake);
    /// a request reconnects by itself if it has ended since.
    pub async fn connect(&self) -> Result<(), WitnessError> {
        self.connected().await.map(|_| ())
    }

    /// Asks `request` and waits for its answer. Cancel-safe: dropped while
    /// it waits, it leaves the connection to be replaced by the next request
    /// (unless the request was a claim), so that request does not wait on a
    /// connection that already failed to answer.
    pub async fn ask(&self, request: &Request) -> Result<Answer, WitnessError> {
        let connection = self.connected().await?;
        let id = self.ids.fetch_add(1, Ordering::Relaxed);
        // Encoded first: a request that cannot be encoded says nothing of
        // the connection.
        let frame = request.to_frame(id)?;
        let claim = matches!(request, Request::Claim { .. });
        let (answer_tx, answer_rx) = oneshot::channel();
        lock(&connection.pending).insert(id, answer_tx);
        let mut asking = Asking {
            connection: &connection,
            id,
            claim,
            answered: false,
        };
        let sent = connection.tx.send(&frame).await;
        if let Err(error) = sent {
            drop(asking);
            self.drop_connection(&connection).await;
            return Err(WitnessError::Lost(error.to_string()));
        }
        let answer = tokio::time::timeout(self.answer_within, answer_rx).await;
        asking.answered = matches!(answer, Ok(Ok(_)));
        // Unanswered: the guard forgets the request and, but for a claim,
        // marks the connection failed.
        drop(asking);
        match answer {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => {
                self.drop_connection(&connection).await;
                Err(WitnessError::Lost("the connection ended".into()))
            }
            Err(_) => {
                // A slow answer to a claim is normal; to anything else it
                // means a dead connection.
                if !claim {
                    self.drop_connection(&connection).await;
                }
                Err(WitnessError::NoAnswer(self.answer_within))
            }
        }
    }

    async fn drop_connection(&self, failed: &Arc<Connection>) {
        let mut current = self.connection.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, failed)) {
            *current = None;
        }
    }

    async fn connected(&self) -> Result<Arc<Connection>, WitnessError> {
        let mut current = self.connection.lock().await;
        if let Some(c) = current.as_ref() {
            if c.usable() {
                return Ok(Arc::clone(c));
            }
        }
        *current = None;
        if self.addrs.is_empty() {
            return Err(WitnessError::NoAddress);
        }
        let mut errors = Vec::new();
        for addr in &self.addrs {
            match tokio::time::timeout(CONNECT_WITHIN, Link::connect(addr.as_str(), &self.link))
                .await
            {
                Ok(Ok(link)) => {
                    info!(witness = %addr, "connected to the witness");
                    let connection = Arc::new(start(link));
                    *current = Some(Arc::clone(&connection));
                    return Ok(connection);
                }
                Ok(Err(e)) => errors.push(format!("{addr}: {e}")),
                Err(_) => errors.push(format!("{addr}: no connection within {CONNECT_WITHIN:?}")),
            }
        }
        Err(WitnessError::Unreachable(errors.join("; ")))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts the reader that hands each answer to its request.
fn start(link: Link) -> Connection {
    let (tx, mut rx) = link.split();
    let pending: Pending = Arc::default();
    let waiting = Arc::clone(&pending);
    let reader = tokio::spawn(async move {
        loop {
            let frame = match rx.recv().await {
                Ok(f) => f,
                Err(error) => {
                    debug!(%error, "the witness connection ended");
                    // Dropping the senders fails every request waiting.
                    lock(&waiting).clear();
                    return;
                }
            };
            match Answer::from_frame(&frame) {
                Ok((id, answer)) => {
                    if let Some(to) = lock(&waiting).remove(&id) {
                        let _ = to.send(answer);
                    }
                }
                Err(error) => debug!(%error, "a malformed answer from the witness was dropped"),
            }
        }
    });
    Connection {
        tx,
        pending,
        reader,
        failed: AtomicBool::new(false),
    }
}
