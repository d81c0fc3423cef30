//! The witness service: listens on ft-link (the pair secret authenticates
//! every connection, the Hello names the node), answers each request in a
//! task of its own (a claim may wait for silence; a hold on another
//! connection must not wait behind it).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ft_link::{LinkConfig, LinkError, LinkListener, LinkSender, PairSecret};
use tracing::{debug, info, warn};

use crate::protocol::{witness_hello, Answer, Request};
use crate::registry::{ClaimStep, Registry, Timing};
use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot listen: {0}")]
    Listen(#[source] LinkError),
}

/// How long a connection may stay silent before the witness drops it
/// (liveness for claims is judged on the silence timeout, not on this).
pub const CONNECTION_TIMEOUT: Duration = Duration::from_secs(3);

pub struct ServerConfig {
    pub listen: String,
    pub secret: PairSecret,
    /// The witness's name in its Hello.
    pub name: String,
    pub timing: Timing,
    pub database: std::path::PathBuf,
}

pub struct Server {
    listener: LinkListener,
    registry: Arc<Mutex<Registry>>,
}

impl Server {
    pub async fn bind(config: ServerConfig) -> Result<Server, ServerError> {
        let store = Store::open(&config.database)?;
        let registry = Registry::new(store, config.timing, Instant::now());
        let link = LinkConfig::new(config.secret, witness_hello(&config.name))
            .with_heartbeat_timeout(CONNECTION_TIMEOUT);
        let listener = LinkListener::bind(config.listen.as_str(), link)
            .await
            .map_err(ServerError::Listen)?;
        info!(
            listen = %config.listen,
            silence_ms = config.timing.silence.as_millis() as u64,
            "witness listening"
        );
        Ok(Server {
            listener,
            registry: Arc::new(Mutex::new(registry)),
        })
    }

    pub fn local_addr(&self) -> std::net::SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves connections until the task is dropped.
    pub async fn serve(self) {
        let ids = AtomicU64::new(1);
        loop {
            match self.listener.accept().await {
                Ok(link) => {
                    let id = ids.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(id, link, Arc::clone(&self.registry)));
                }
                Err(error) => warn!(%error, "a connection to the witness failed"),
            }
        }
    }
}

/// Serves one connection until it ends.
async fn connection(id: u64, link: ft_link::Link, registry: Arc<Mutex<Registry>>) {
    let node = link.peer_hello().node_name.clone();
    let peer = link.peer_addr();
    info!(%peer, node, "node connected to the witness");
    let (tx, mut rx) = link.split();
    let tx = Arc::new(tx);
    let liveness = rx.liveness();
    let ended = loop {
        let frame = match rx.recv().await {
            Ok(f) => f,
            Err(e) => break e.to_string(),
        };
        let (request_id, request) = match Request::from_frame(&frame) {
            Ok(r) => r,
            Err(error) => {
                warn!(node, %error, "malformed request refused");
                let refusal = Answer::Refused {
                    reason: error.to_string(),
                };
                send(&tx, 0, &refusal).await;
                continue;
            }
        };
        if let Some(vm) = request.vm() {
            lock(&registry).touch(vm, &node, Some((id, &liveness)), Instant::now());
        }
        let (registry, tx, node) = (Arc::clone(&registry), Arc::clone(&tx), node.clone());
        tokio::spawn(async move {
            let answer = answer(&registry, &node, request).await;
            send(&tx, request_id, &answer).await;
        });
    };
    lock(&registry).disconnected(id);
    info!(%peer, node, why = ended, "node disconnected from the witness");
}

fn lock(registry: &Mutex<Registry>) -> std::sync::MutexGuard<'_, Registry> {
    // A panic while holding the lock leaves records that are all on disk:
    // going on with them is safe.
    registry.lock().unwrap_or_else(|p| p.into_inner())
}

async fn send(tx: &LinkSender, id: u64, answer: &Answer) {
    match answer.to_frame(id) {
        Ok(frame) => {
            if let Err(error) = tx.send(&frame).await {
                debug!(%error, "an answer could not be sent");
            }
        }
        Err(error) => warn!(%error, "an answer could not be encoded"),
    }
}

/// How long a claim is held open while the owner is still heard before
/// the answer is "owner heard" (the standby asks again).
fn claim_patience(timing: Timing) -> Duration {
    timing.silence * 2
}

async fn answer(registry: &Mutex<Registry>, node: &str, request: Request) -> Answer {
    let (vm, generation) = match request {
        Request::Hold { vm, generation } => return lock(registry).hold(node, &vm, generation),
        Request::Confirm { vm, generation } => {
            let answer = lock(registry).confirm(node, &vm, generation);
            info!(vm, node, generation, ?answer, "confirm");
            return answer;
        }
        Request::Force { vm } => return lock(registry).force(node, &vm),
        Request::Release { vm, generation } => {
            let answer = lock(registry).release(node, &vm, generation);
            info!(vm, node, generation, ?answer, "release");
            return answer;
        }
        Request::Show => return lock(registry).show(Instant::now()),
        Request::Claim { vm, generation } => (vm, generation),
    };
    let give_up = Instant::now() + claim_patience(lock(registry).timing());
    loop {
        let step = lock(registry).claim(node, &vm, generation, Instant::now());
        match step {
            ClaimStep::Decided(answer) => {
                info!(vm, node, generation, ?answer, "claim");
                return answer;
            }
            ClaimStep::WaitUntil(at) => {
                let now = Instant::now();
                if at > give_up {
                    let registry = lock(registry);
                    if registry.in_startup_grace(now) {
                        return Answer::Refused {
                            reason: format!(
                                "the witness started moments ago: it grants no takeover in its first \
                                 {} ms (the primaries reconnect meanwhile); ask again",
                                registry.timing().startup_grace.as_millis()
                            ),
                        };
                    }
                    let answer = registry.owner_heard(&vm, now);
                    info!(vm, node, generation, ?answer, "claim: owner still heard");
                    return answer;
                }
                // Look again at the instant named, or sooner (the owner
                // may have moved on meanwhile).
                let wait = at
                    .saturating_duration_since(now)
                    .min(Duration::from_millis(50));
                tokio::time::sleep(wait).await;
            }
        }
    }
}
