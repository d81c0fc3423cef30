//! The A-link transport: one TCP connection between the two nodes, opened by
//! an authenticated handshake, carrying checked frames, kept alive by
//! heartbeats.
//!
//! Handshake (every frame has epoch 0), run identically by both sides:
//! 1. `Challenge` with a fresh nonce; read the peer's `Challenge`.
//! 2. `Response` with our proof ([`auth::prove`]); read the peer's
//!    `Response` and verify it. A failed proof: `Refusal` and stop.
//! 3. `Hello`; read the peer's `Hello` and check it pairs with ours
//!    ([`Hello::check_pairs_with`]). A mismatch: `Refusal` naming it, stop.
//! 4. `Accepted` (carrying the port of this end's pulse socket, see
//!    [`crate::pulse`]); read the peer's verdict (`Accepted` or
//!    `Refusal`).
//!
//! A `Refusal` received at any step ends the handshake with
//! [`LinkError::PeerRefused`] carrying the peer's reason.
//!
//! Once established, a heartbeat task sends a `Heartbeat` frame whenever
//! nothing was sent for `heartbeat_interval`, and a pulse thread sends and
//! receives pulses on the link's own UDP socket (a busy node cannot starve
//! them); [`Link::recv`] skips heartbeats and fails with
//! [`LinkError::PeerSilent`] when neither a byte nor a pulse arrived for
//! `heartbeat_timeout`. Any error from `recv` is final.
//!
//! Flow control is the replicator's (it keeps at most one epoch in flight);
//! a link is exactly one TCP connection, and a redundant pair is two links
//! that the replicator uses as an active path and a backup path (see
//! `replicator::replica`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, trace, warn};

use crate::auth::{self, AuthError, Nonce, PairSecret, Side};
use crate::frame::{Frame, FrameDecoder, FrameError, FrameKind, MAX_LINK_PAYLOAD};
use crate::hello::{Hello, HelloError, Mismatch, Refusal};
use crate::pulse::{PulseConfig, PulseSocket, Pulses};

/// The peer is declared silent after this much silence (the one default of
/// the project: `ftprotect --heartbeat-timeout-ms` uses it too).
pub const DEFAULT_HEARTBEAT_TIMEOUT: Duration = Duration::from_millis(300);
/// [`heartbeat_interval_for`] the default timeout (60 ms).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = heartbeat_interval_for(DEFAULT_HEARTBEAT_TIMEOUT);
/// Heartbeats never go out more often than this.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Payloads from this size on are written after their header without
/// being copied into the send buffer.
const LARGE_PAYLOAD: usize = 16 << 10;

/// How a node opens and keeps its end of the A-link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    pub secret: PairSecret,
    /// What this node tells the peer.
    pub hello: Hello,
    /// A heartbeat goes out when nothing was sent for this long.
    pub heartbeat_interval: Duration,
    /// The peer is declared silent when nothing arrived for this long.
    pub heartbeat_timeout: Duration,
    /// Bound on the whole handshake.
    pub handshake_timeout: Duration,
    /// A send fails when the peer took nothing for this long (a hung peer
    /// whose kernel still answers window probes would otherwise block it
    /// forever); see [`send_stall_timeout_for`].
    pub send_stall_timeout: Duration,
    /// Pulses (heartbeats on a socket and a thread of their own) when the
    /// peer offers them too.
    pub pulses: bool,
}

/// The send stall timeout that goes with a heartbeat timeout: four times
/// it, at least [`MIN_SEND_STALL_TIMEOUT`] (a standby applying a large
/// epoch may stop reading for a moment; a dead one never resumes).
pub fn send_stall_timeout_for(heartbeat_timeout: Duration) -> Duration {
    (heartbeat_timeout * 4).max(MIN_SEND_STALL_TIMEOUT)
}

/// The shortest send stall timeout.
pub const MIN_SEND_STALL_TIMEOUT: Duration = Duration::from_secs(1);

impl LinkConfig {
    pub fn new(secret: PairSecret, hello: Hello) -> LinkConfig {
        LinkConfig {
            secret,
            hello,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            heartbeat_timeout: DEFAULT_HEARTBEAT_TIMEOUT,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            send_stall_timeout: send_stall_timeout_for(DEFAULT_HEARTBEAT_TIMEOUT),
            pulses: true,
        }
    }

    /// Declares the peer silent after `timeout`, with heartbeats every
    /// [`heartbeat_interval_for`] it.
    pub fn with_heartbeat_timeout(mut self, timeout: Duration) -> LinkConfig {
        self.heartbeat_timeout = timeout;
        self.send_stall_timeout = send_stall_timeout_for(timeout);
        self.heartbeat_interval = heartbeat_interval_for(timeout);
        self
    }
}

/// The heartbeat interval that goes with a heartbeat timeout: a fifth of it
/// (four heartbeats in a row may be lost before the peer is declared
/// silent), but at least [`MIN_HEARTBEAT_INTERVAL`].
pub const fn heartbeat_interval_for(timeout: Duration) -> Duration {
    let fifth = Duration::from_nanos((timeout.as_nanos() / 5) as u64);
    if fifth.as_nanos() < MIN_HEARTBEAT_INTERVAL.as_nanos() {
        MIN_HEARTBEAT_INTERVAL
    } else {
        fifth
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("could not connect the A-link to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not bind the A-link listener to {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("could not accept an A-link connection")]
    Accept {
        #[source]
        source: std::io::Error,
    },
    #[error("could not read the peer address of an A-link connection")]
    PeerAddress {
        #[source]
        source: std::io::Error,
    },
    #[error("could not set TCP_NODELAY on the A-link to {peer}")]
    NoDelay {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not prepare authentication with {peer}")]
    AuthSetup {
        peer: SocketAddr,
        #[source]
        source: AuthError,
    },
    #[error("authentication of {peer} failed")]
    AuthenticationFailed {
        peer: SocketAddr,
        #[source]
        source: AuthError,
    },
    #[error("{peer} refused to pair: {reason}")]
    PeerRefused { peer: SocketAddr, reason: Refusal },
    #[error("refusing to pair with {peer}")]
    Incompatible {
        peer: SocketAddr,
        #[source]
        mismatch: Box<Mismatch>,
    },
    #[error("bad handshake payload from or for {peer}")]
    HandshakePayload {
        peer: SocketAddr,
        #[source]
        source: HelloError,
    },
    #[error("handshake with {peer}: expected a {expected:?} frame, got {got:?}")]
    UnexpectedFrame {
        peer: SocketAddr,
        expected: FrameKind,
        got: FrameKind,
    },
    #[error("handshake with {peer} did not finish within {after:?}")]
    HandshakeTimeout { peer: SocketAddr, after: Duration },
    #[error("could not encode a {kind:?} frame for {peer}")]
    Encode {
        peer: SocketAddr,
        kind: FrameKind,
        #[source]
        source: FrameError,
    },
    /// The link cannot be used after this (a frame may be cut short).
    #[error("{peer} took nothing sent to it for {after:?}: the peer is not reading")]
    SendStalled { peer: SocketAddr, after: Duration },
    #[error("could not send to {peer}")]
    Send {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("could not receive from {peer}")]
    Receive {
        peer: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("frame from {peer} refused, the link is ended")]
    Corrupt {
        peer: SocketAddr,
        #[source]
        source: FrameError,
    },
    #[error("{peer} closed the link inside a frame ({received} bytes of it received)")]
    Truncated { peer: SocketAddr, received: usize },
    #[error("{peer} closed the link")]
    PeerClosed { peer: SocketAddr },
    #[error("nothing arrived from {peer} for {after:?}: the peer is silent")]
    PeerSilent { peer: SocketAddr, after: Duration },
    #[error("the link to {peer} already ended with an error")]
    Ended { peer: SocketAddr },
}

/// Frame I/O on the whole stream, for the handshake.
struct HandshakeIo<'a> {
    stream: &'a mut TcpStream,
    peer: SocketAddr,
    rx: BytesMut,
    decoder: FrameDecoder,
    tx: BytesMut,
}

impl HandshakeIo<'_> {
    async fn write(&mut self, kind: FrameKind, payload: impl Into<Bytes>) -> Result<(), LinkError> {
        let peer = self.peer;
        self.tx.clear();
        Frame::new(kind, 0, payload)
            .encode(&mut self.tx)
            .map_err(|source| LinkError::Encode { peer, kind, source })?;
        self.stream
            .write_all(&self.tx)
            .await
            .map_err(|source| LinkError::Send { peer, source })
    }

    /// A handshake frame: none is larger than the link's own frames
    /// ([`MAX_LINK_PAYLOAD`]), messages included, until the peer proved
    /// the pair secret.
    async fn read(&mut self) -> Result<Frame, LinkError> {
        read_frame_within(
            &mut *self.stream,
            self.peer,
            &mut self.rx,
            &mut self.decoder,
            MAX_LINK_PAYLOAD,
        )
        .await
    }

    /// The next frame, which must be of kind `expected`; a `Refusal` is the
    /// peer's reason to stop.
    async fn read_expecting(&mut self, expected: FrameKind) -> Result<Bytes, LinkError> {
        let frame = self.read().await?;
        match frame.kind {
            kind if kind == expected => Ok(frame.payload),
            FrameKind::Refusal => Err(refusal_error(self.peer, &frame.payload)),
            got => Err(LinkError::UnexpectedFrame {
                peer: self.peer,
                expected,
                got,
            }),
        }
    }

    /// Tells the peer why we stop, closes our direction and waits for the
    /// peer to close its own (so that our close does not reset the
    /// connection before the peer read the refusal). The caller bounds the
    /// wait.
    async fn refuse(&mut self, reason: Refusal) {
        warn!(peer = %self.peer, %reason, "refusing to pair");
        let sent = match reason.to_payload() {
            Ok(payload) => self.write(FrameKind::Refusal, payload).await,
            Err(source) => Err(LinkError::HandshakePayload {
                peer: self.peer,
                source,
            }),
        };
        if let Err(error) = sent {
            debug!(peer = %self.peer, %error, "refusal not sent");
            return;
        }
        if self.stream.shutdown().await.is_err() {
            return;
        }
        let mut discard = [0u8; 1024];
        while matches!(self.stream.read(&mut discard).await, Ok(n) if n > 0) {}
    }
}

fn refusal_error(peer: SocketAddr, payload: &[u8]) -> LinkError {
    match Refusal::from_payload(payload) {
        Ok(reason) => {
            warn!(%peer, %reason, "peer refused to pair");
            LinkError::PeerRefused { peer, reason }
        }
        Err(source) => LinkError::HandshakePayload { peer, source },
    }
}

/// Reads until `rx` holds a whole frame (heartbeats included) whose
/// payload is at most `cap`.
async fn read_frame_within<R: AsyncRead + Unpin>(
    reader: &mut R,
    peer: SocketAddr,
    rx: &mut BytesMut,
    decoder: &mut FrameDecoder,
    cap: u32,
) -> Result<Frame, LinkError> {
    loop {
        if let Some(frame) = decoder
            .decode_within(rx, cap)
            .map_err(|source| LinkError::Corrupt { peer, source })?
        {
            return Ok(frame);
        }
        let n = reader
            .read_buf(rx)
            .await
            .map_err(|source| LinkError::Receive { peer, source })?;
        if n == 0 {
            return Err(end_of_stream(peer, decoder, rx));
        }
    }
}

fn end_of_stream(peer: SocketAddr, decoder: &FrameDecoder, rx: &BytesMut) -> LinkError {
    match decoder.finish(rx) {
        Ok(()) => LinkError::PeerClosed { peer },
        Err(_) => LinkError::Truncated {
            peer,
            received: rx.len(),
        },
    }
}

/// Runs the handshake on `stream` as `side`; returns the peer's Hello and
/// whatever the peer already sent past the handshake.
/// What a finished handshake gives: the peer's Hello, bytes already read
/// past it, and the peer's pulse port with the link's pulse key (when both
/// ends offered pulses).
pub(crate) struct Handshaken {
    pub hello: Hello,
    pub rx: BytesMut,
    pub pulse: Option<(u16, [u8; 32])>,
}

/// The handshake without pulses (a peer that offers none).
#[cfg(test)]
pub(crate) async fn handshake(
    stream: &mut TcpStream,
    side: Side,
    config: &LinkConfig,
) -> Result<(Hello, BytesMut), LinkError> {
    let done = handshake_with(stream, side, config, None).await?;
    Ok((done.hello, done.rx))
}

pub(crate) async fn handshake_with(
    stream: &mut TcpStream,
    side: Side,
    config: &LinkConfig,
    pulse_port: Option<u16>,
) -> Result<Handshaken, LinkError> {
    let peer = stream
        .peer_addr()
        .map_err(|source| LinkError::PeerAddress { source })?;
    let mut io = HandshakeIo {
        stream,
        peer,
        rx: BytesMut::with_capacity(4096),
        decoder: FrameDecoder,
        tx: BytesMut::with_capacity(512),
    };
    let stopped = match tokio::time::timeout(
        config.handshake_timeout,
        run_handshake(&mut io, side, config, pulse_port),
    )
    .await
    {
        Ok(Ok((hello, pulse))) => {
            return Ok(Handshaken {
                hello,
                rx: io.rx,
                pulse,
            })
        }
        Ok(Err(stopped)) => stopped,
        Err(_) => {
            return Err(LinkError::HandshakeTimeout {
                peer,
                after: config.handshake_timeout,
            })
        }
    };
    if let Some(reason) = stopped.refusal {
        // Delivering the refusal is best effort, in its own bounded time:
        // the error to report is the one that made us refuse.
        if tokio::time::timeout(config.handshake_timeout, io.refuse(reason))
            .await
            .is_err()
        {
            debug!(%peer, "peer did not close after our refusal");
        }
    }
    Err(stopped.error)
}

/// Why a handshake stopped, and what to tell the peer if anything.
struct HandshakeStop {
    error: LinkError,
    refusal: Option<Refusal>,
}

impl From<LinkError> for HandshakeStop {
    fn from(error: LinkError) -> Self {
        HandshakeStop {
            error,
            refusal: None,
        }
    }
}

async fn run_handshake(
    io: &mut HandshakeIo<'_>,
    side: Side,
    config: &LinkConfig,
    pulse_port: Option<u16>,
) -> Result<(Hello, Option<(u16, [u8; 32])>), HandshakeStop> {
    let peer = io.peer;
    let my_nonce = Nonce::fresh().map_err(|source| LinkError::AuthSetup { peer, source })?;
    io.write(FrameKind::Challenge, my_nonce.as_bytes().to_vec())
        .await?;
    let their_nonce = io.read_expecting(FrameKind::Challenge).await?;
    let their_nonce = Nonce::from_wire(&their_nonce).map_err(|source| HandshakeStop {
        refusal: Some(Refusal::ProtocolViolation(source.to_string())),
        error: LinkError::AuthenticationFailed { peer, source },
    })?;
    let proof = auth::prove(&config.secret, side, &their_nonce, &my_nonce);
    io.write(FrameKind::Response, proof.to_vec()).await?;
    let their_proof = io.read_expecting(FrameKind::Response).await?;
    auth::verify(
        &config.secret,
        side.other(),
        &my_nonce,
        &their_nonce,
        &their_proof,
    )
    .map_err(|source| HandshakeStop {
        refusal: Some(Refusal::AuthenticationFailed),
        error: LinkError::AuthenticationFailed { peer, source },
    })?;
    debug!(%peer, %side, "peer authenticated");

    let hello = config
        .hello
        .to_payload()
        .map_err(|source| LinkError::HandshakePayload { peer, source })?;
    io.write(FrameKind::Hello, hello).await?;
    let their_hello = io.read_expecting(FrameKind::Hello).await?;
    let their_hello = Hello::from_payload(&their_hello).map_err(|source| HandshakeStop {
        refusal: Some(Refusal::ProtocolViolation(source.to_string())),
        error: LinkError::HandshakePayload { peer, source },
    })?;
    config
        .hello
        .check_pairs_with(&their_hello)
        .map_err(|mismatch| HandshakeStop {
            refusal: Some(Refusal::Incompatible(mismatch.clone())),
            error: LinkError::Incompatible { peer, mismatch },
        })?;
    let offer = pulse_port.map_or_else(Bytes::new, |p| Bytes::copy_from_slice(&p.to_be_bytes()));
    io.write(FrameKind::Accepted, offer).await?;
    let accepted = io.read_expecting(FrameKind::Accepted).await?;
    // A peer that offers no pulse port (or an older one) gets none.
    let their_port = <[u8; 2]>::try_from(&accepted[..])
        .ok()
        .map(u16::from_be_bytes);
    let pulse = match (pulse_port, their_port) {
        (Some(_), Some(port)) => {
            let (connecting, accepting) = match side {
                Side::Connecting => (&my_nonce, &their_nonce),
                Side::Accepting => (&their_nonce, &my_nonce),
            };
            Some((port, auth::pulse_key(&config.secret, connecting, accepting)))
        }
        _ => None,
    };
    Ok((their_hello, pulse))
}

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

/// An established A-link.
pub struct Link {
    peer_hello: Hello,
    sender: LinkSender,
    receiver: LinkReceiver,
}

impl Link {
    /// Connects to `addr` and runs the handshake.
    pub async fn connect(
        addr: impl ToSocketAddrs + std::fmt::Debug,
        config: &LinkConfig,
    ) -> Result<Link, LinkError> {
        let shown = format!("{addr:?}");
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|source| LinkError::Connect {
                addr: shown,
                source,
            })?;
        Link::establish(stream, Side::Connecting, config).await
    }

    async fn establish(
        mut stream: TcpStream,
        side: Side,
        config: &LinkConfig,
    ) -> Result<Link, LinkError> {
        let peer = stream
            .peer_addr()
            .map_err(|source| LinkError::PeerAddress { source })?;
        stream
            .set_nodelay(true)
            .map_err(|source| LinkError::NoDelay { peer, source })?;
        // The pulse socket is bound first: its port goes to the peer in the
        // handshake. No pulses is a degraded link, not a failed one.
        let pulse_socket = if config.pulses {
            let local = stream
                .local_addr()
                .map_err(|source| LinkError::PeerAddress { source })?;
            PulseSocket::bind(local.ip())
                .map_err(|error| warn!(%peer, %error, "no pulse socket: heartbeats only"))
                .ok()
        } else {
            None
        };
        let done = handshake_with(
            &mut stream,
            side,
            config,
            pulse_socket.as_ref().map(PulseSocket::port),
        )
        .await?;
        let (peer_hello, rx) = (done.hello, done.rx);
        let liveness = Liveness::new();
        let pulses = match (pulse_socket, done.pulse) {
            (Some(socket), Some((port, key))) => {
                let pulse = PulseConfig {
                    key,
                    side,
                    peer: SocketAddr::new(peer.ip(), port),
                    interval: config.heartbeat_interval,
                };
                Pulses::start(socket, pulse, liveness.clone())
                    .map_err(|error| warn!(%peer, %error, "no pulse thread: heartbeats only"))
                    .ok()
            }
            _ => None,
        };
        info!(
            %peer, %side,
            peer_node = %peer_hello.node_name,
            peer_role = %peer_hello.role,
            pulses = pulses.is_some(),
            "A-link established"
        );
        let (read_half, write_half) = stream.into_split();
        let writer = Arc::new(Mutex::new(Writer {
            half: write_half,
            last_sent: Instant::now(),
            tx: BytesMut::new(),
            stall: config.send_stall_timeout,
        }));
        let heartbeats = tokio::spawn(send_heartbeats(
            writer.clone(),
            peer,
            config.heartbeat_interval,
        ));
        Ok(Link {
            peer_hello,
            sender: LinkSender {
                peer,
                writer,
                heartbeats,
                pulses: std::sync::Mutex::new(pulses),
            },
            receiver: LinkReceiver {
                peer,
                reader: read_half,
                rx,
                decoder: FrameDecoder,
                liveness,
                silence_timeout: config.heartbeat_timeout,
                ended: false,
            },
        })
    }

    /// What the peer said in its Hello.
    pub fn peer_hello(&self) -> &Hello {
        &self.peer_hello
    }

    pub fn peer_addr(&self) -> SocketAddr {
        self.sender.peer
    }

    /// A handle telling when the peer was last heard on this link.
    pub fn liveness(&self) -> Liveness {
        self.receiver.liveness()
    }

    pub async fn send(&self, frame: &Frame) -> Result<(), LinkError> {
        self.sender.send(frame).await
    }

    /// The next frame that is not a heartbeat. Any error is final: the link
    /// stops its heartbeats and closes its sending direction.
    pub async fn recv(&mut self) -> Result<Frame, LinkError> {
        let result = self.receiver.recv().await;
        if result.is_err() {
            self.sender.close().await;
        }
        result
    }

    /// Separate halves, to send and receive from different tasks.
    /// Heartbeats go out as long as the sender lives.
    pub fn split(self) -> (LinkSender, LinkReceiver) {
        (self.sender, self.receiver)
    }
}

struct Writer {
    half: OwnedWriteHalf,
    last_sent: Instant,
    tx: BytesMut,
    /// A write that makes no progress for this long fails.
    stall: Duration,
}

/// Writes all of `buf`, failing when no byte is taken for `stall`.
async fn write_all_within(
    half: &mut OwnedWriteHalf,
    buf: &[u8],
    stall: Duration,
    peer: SocketAddr,
) -> Result<(), LinkError> {
    let mut pos = 0;
    while pos < buf.len() {
        match tokio::time::timeout(stall, half.write(&buf[pos..])).await {
            Ok(Ok(0)) => {
                return Err(LinkError::Send {
                    peer,
                    source: std::io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(Ok(n)) => pos += n,
            Ok(Err(source)) => return Err(LinkError::Send { peer, source }),
            Err(_) => return Err(LinkError::SendStalled { peer, after: stall }),
        }
    }
    Ok(())
}

impl Writer {
    async fn write(&mut self, peer: SocketAddr, frame: &Frame) -> Result<(), LinkError> {
        let encode_err = |source| LinkError::Encode {
            peer,
            kind: frame.kind,
            source,
        };
        self.tx.clear();
        if frame.payload.len() < LARGE_PAYLOAD {
            frame.encode(&mut self.tx).map_err(encode_err)?;
            write_all_within(&mut self.half, &self.tx, self.stall, peer).await?;
        } else {
            // Large payloads (page frames) go out as they are, after the
            // header: no copy into the send buffer.
            frame.encode_header(&mut self.tx).map_err(encode_err)?;
            write_all_within(&mut self.half, &self.tx, self.stall, peer).await?;
            write_all_within(&mut self.half, &frame.payload, self.stall, peer).await?;
        }
        self.last_sent = Instant::now();
        Ok(())
    }
}

async fn send_heartbeats(writer: Arc<Mutex<Writer>>, peer: SocketAddr, interval: Duration) {
    let heartbeat = Frame::new(FrameKind::Heartbeat, 0, Bytes::new());
    loop {
        let due = writer.lock().await.last_sent + interval;
        tokio::time::sleep_until(due).await;
        let mut writer = writer.lock().await;
        if writer.last_sent + interval > Instant::now() {
            continue;
        }
        if let Err(error) = writer.write(peer, &heartbeat).await {
            warn!(%peer, %error, "heartbeats stopped");
            return;
        }
        trace!(%peer, "heartbeat sent");
    }
}

/// The sending half of a link; it also sends the heartbeats.
pub struct LinkSender {
    peer: SocketAddr,
    writer: Arc<Mutex<Writer>>,
    heartbeats: JoinHandle<()>,
    /// The link's pulses (stopped when this half closes or goes).
    pulses: std::sync::Mutex<Option<Pulses>>,
}

impl LinkSender {
    /// Sends one frame. Do not cancel this future: a frame cut in the
    /// middle corrupts the stream for the peer.
    pub async fn send(&self, frame: &Frame) -> Result<(), LinkError> {
        self.writer.lock().await.write(self.peer, frame).await
    }

    /// Stops heartbeats and closes the sending direction.
    pub async fn close(&self) {
        self.heartbeats.abort();
        self.pulses.lock().unwrap_or_else(|p| p.into_inner()).take();
        let _ = self.writer.lock().await.half.shutdown().await;
    }
}

impl Drop for LinkSender {
    fn drop(&mut self) {
        self.heartbeats.abort();
    }
}

/// When anything (heartbeats included) last arrived on a link, readable
/// while another task is blocked receiving on it.
#[derive(Debug, Clone)]
pub struct Liveness {
    base: Instant,
    /// Microseconds after `base` of the last arrival.
    last_us: Arc<std::sync::atomic::AtomicU64>,
}

impl Liveness {
    fn new() -> Liveness {
        Liveness {
            base: Instant::now(),
            last_us: Arc::default(),
        }
    }

    /// Something arrived now (a byte on the connection, or a pulse, from
    /// another thread).
    pub(crate) fn mark(&self) {
        let us = self.base.elapsed().as_micros() as u64;
        self.last_us
            .fetch_max(us, std::sync::atomic::Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.base + Duration::from_micros(self.last_us.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// The last arrival (the link's start if nothing arrived yet).
    pub fn last_arrival(&self) -> std::time::Instant {
        self.last().into_std()
    }
}

/// The receiving half of a link.
pub struct LinkReceiver {
    peer: SocketAddr,
    reader: OwnedReadHalf,
    rx: BytesMut,
    decoder: FrameDecoder,
    liveness: Liveness,
    silence_timeout: Duration,
    ended: bool,
}

impl LinkReceiver {
    /// A handle telling when the peer was last heard on this link.
    pub fn liveness(&self) -> Liveness {
        self.liveness.clone()
    }

    /// The next frame that is not a heartbeat. Fails with
    /// [`LinkError::PeerSilent`] when nothing arrived for the heartbeat
    /// timeout. Cancel-safe. Any error is final.
    pub async fn recv(&mut self) -> Result<Frame, LinkError> {
        if self.ended {
            return Err(LinkError::Ended { peer: self.peer });
        }
        let result = self.next_frame().await;
        if let Err(error) = &result {
            warn!(peer = %self.peer, %error, "A-link ended");
            self.ended = true;
        }
        result
    }

    async fn next_frame(&mut self) -> Result<Frame, LinkError> {
        let peer = self.peer;
        loop {
            let decoded = self
                .decoder
                .decode(&mut self.rx)
                .map_err(|source| LinkError::Corrupt { peer, source })?;
            match decoded {
                Some(frame) if frame.kind == FrameKind::Heartbeat => continue,
                Some(frame) if frame.kind == FrameKind::Refusal => {
                    return Err(refusal_error(peer, &frame.payload));
                }
                Some(frame) => return Ok(frame),
                None => {}
            }
            // Silence is judged on bytes and pulses alike (a pulse may
            // have come in while this waited: look again before judging).
            let deadline = self.liveness.last() + self.silence_timeout;
            match tokio::time::timeout_at(deadline, self.reader.read_buf(&mut self.rx)).await {
                Err(_) if self.liveness.last() + self.silence_timeout > Instant::now() => {}
                Err(_) => {
                    return Err(LinkError::PeerSilent {
                        peer,
                        after: self.liveness.last().elapsed(),
                    })
                }
                Ok(Err(source)) => return Err(LinkError::Receive { peer, source }),
                Ok(Ok(0)) => return Err(end_of_stream(peer, &self.decoder, &self.rx)),
                Ok(Ok(_)) => self.liveness.mark(),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hello::{CpuFeatureSummary, Role};

    const SECRET: &[u8] = b"pair-secret-0123456789-abcdefgh";
    /// Bounds every wait for an event that must happen.
    const WITHIN: Duration = Duration::from_secs(5);

    fn config(name: &str, role: Role, secret: &[u8]) -> LinkConfig {
        let hello = Hello::new(
            name,
            role,
            CpuFeatureSummary {
                name: "baseline-v1".into(),
                words: vec![0x0000_1fff, 0xdead_beef, 7],
            },
            "vm-sha256:0f0f",
        );
        let mut config = LinkConfig::new(PairSecret::new(secret.to_vec()).unwrap(), hello);
        config.heartbeat_interval = Duration::from_millis(50);
        config.heartbeat_timeout = Duration::from_millis(300);
        config
    }

    #[test]
    fn heartbeat_interval_is_a_fifth_of_the_timeout_at_least_10_ms() {
        let ms = Duration::from_millis;
        assert_eq!(DEFAULT_HEARTBEAT_TIMEOUT, ms(300));
        assert_eq!(DEFAULT_HEARTBEAT_INTERVAL, ms(60));
        assert_eq!(heartbeat_interval_for(ms(1000)), ms(200));
        assert_eq!(heartbeat_interval_for(ms(30)), ms(10));
        let c = config("a", Role::Primary, SECRET).with_heartbeat_timeout(ms(500));
        assert_eq!(
            (c.heartbeat_timeout, c.heartbeat_interval),
            (ms(500), ms(100))
        );
        let d = LinkConfig::new(c.secret.clone(), c.hello.clone());
        assert_eq!(
            (d.heartbeat_timeout, d.heartbeat_interval),
            (DEFAULT_HEARTBEAT_TIMEOUT, DEFAULT_HEARTBEAT_INTERVAL)
        );
    }

    /// Pairs a listener with `accepting` and a connector with `connecting`;
    /// returns both handshake results.
    async fn pair(
        accepting: LinkConfig,
        connecting: LinkConfig,
    ) -> (Result<Link, LinkError>, Result<Link, LinkError>) {
        let listener = LinkListener::bind("127.0.0.1:0", accepting).await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), Link::connect(addr, &connecting))
        })
        .await
        .expect("handshake finished")
    }

    fn encoded(frame: &Frame) -> BytesMut {
        let mut out = BytesMut::new();
        frame.encode(&mut out).unwrap();
        out
    }

    /// Issue 9 (defect 4's last part): a stranger that opens with the
    /// header of a 64 MiB message is refused at once; before, the
    /// accepting side reserved 64 MiB for it and waited for the handshake's
    /// timeout (32 such strangers at once: 2 GiB).
    #[tokio::test]
    async fn a_stranger_announcing_a_huge_message_is_refused_before_anything_is_reserved() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stranger = tokio::spawn(async move {
            let mut raw = TcpStream::connect(addr).await.unwrap();
            let huge = Frame::message(64, 0, 0, vec![0u8; 64 << 20]).unwrap();
            let mut header = BytesMut::new();
            huge.encode_header(&mut header).unwrap();
            raw.write_all(&header).await.unwrap();
            // Stay connected, send nothing more.
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let (stream, _) = listener.accept().await.unwrap();
        let accepting = config("node-a", Role::Primary, SECRET);
        let outcome = tokio::time::timeout(
            Duration::from_secs(2),
            Link::establish(stream, Side::Accepting, &accepting),
        )
        .await
        .expect("refused at once, not after the handshake's timeout");
        match outcome {
            Err(LinkError::Corrupt {
                source: FrameError::TooLong { len, max, .. },
                ..
            }) => {
                assert_eq!((len, max), (64 << 20, MAX_LINK_PAYLOAD));
            }
            Err(other) => panic!("wrong error: {other}"),
            Ok(_) => panic!("paired with a stranger"),
        }
        stranger.abort();
    }

    /// A raw peer that runs the real handshake as the connecting side and
    /// then owns the bare socket.
    async fn raw_connected_peer(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        handshake(
            &mut stream,
            Side::Connecting,
            &config("raw", Role::Standby, SECRET),
        )
        .await
        .unwrap();
        stream
    }

    async fn listener_with_raw_peer() -> (Link, TcpStream) {
        let listener = LinkListener::bind("127.0.0.1:0", config("a", Role::Primary, SECRET))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (link, raw) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), raw_connected_peer(addr))
        })
        .await
        .expect("handshake finished");
        (link.unwrap(), raw)
    }

    #[tokio::test]
    async fn handshake_succeeds_and_both_sides_see_each_others_hello() {
        let a = config("node-a", Role::Primary, SECRET);
        let b = config("node-b", Role::Standby, SECRET);
        let (accepted, connected) = pair(a.clone(), b.clone()).await;
        let (accepted, connected) = (accepted.unwrap(), connected.unwrap());
        assert_eq!(accepted.peer_hello(), &b.hello);
        assert_eq!(connected.peer_hello(), &a.hello);
    }

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

    /// Issue 9, defect 2: a peer that stops reading (a stopped process
    /// whose kernel still answers window probes) blocked a send forever.
    /// Now the send fails when nothing was taken for the stall timeout (it
    /// hung before: the 10 s bound here ran out).
    #[tokio::test]
    async fn a_send_to_a_peer_that_stopped_reading_fails_in_bounded_time() {
        let a = config("node-a", Role::Primary, SECRET);
        let b = config("node-b", Role::Standby, SECRET);
        let stall = a.send_stall_timeout;
        assert_eq!(stall, Duration::from_millis(1200));
        let listener = LinkListener::bind("127.0.0.1:0", b).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), Link::connect(addr, &a));
        // The standby's side is kept, never read from.
        let _not_reading = accepted.unwrap();
        let connected = connected.unwrap();
        let payload = Bytes::from(vec![0x5au8; 1 << 20]);
        let frame = Frame::message(64, 1, 1, payload).unwrap();
        let started = std::time::Instant::now();
        let result = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Err(e) = connected.send(&frame).await {
                    return e;
                }
            }
        })
        .await
        .expect("the send failed instead of blocking");
        assert!(
            matches!(result, LinkError::SendStalled { after, .. } if after == stall),
            "{result}"
        );
        // The buffers filled fast; the failure came one stall timeout later.
        assert!(started.elapsed() < stall + Duration::from_secs(3));
    }

    #[tokio::test]
    async fn wrong_secret_is_refused_on_both_sides() {
        let a = config("node-a", Role::Primary, SECRET);
        let b = config("node-b", Role::Standby, b"another-secret-of-the-wrong-pair");
        let (accepted, connected) = pair(a, b).await;
        for (side, result) in [("accepting", accepted), ("connecting", connected)] {
            match result {
                // Each side checks the other's proof; the refusal of the
                // peer may also be what a side reads first.
                Err(LinkError::AuthenticationFailed {
                    source: AuthError::ProofRejected { .. },
                    ..
                })
                | Err(LinkError::PeerRefused {
                    reason: Refusal::AuthenticationFailed,
                    ..
                }) => {}
                Err(other) => panic!("{side}: wrong error {other}"),
                Ok(_) => panic!("{side}: paired with a wrong secret"),
            }
        }
    }

    /// Plays the peer of a handshake with a raw socket that answers with a
    /// bogus proof; returns everything the real side wrote.
    async fn capture_against_bogus_prover(raw: &mut TcpStream) -> Vec<u8> {
        let mut seen = BytesMut::new();
        let mut decoder = FrameDecoder;
        let peer = raw.peer_addr().unwrap();
        let challenge = read_frame_within(raw, peer, &mut seen, &mut decoder, u32::MAX)
            .await
            .unwrap();
        assert_eq!(challenge.kind, FrameKind::Challenge);
        raw.write_all(&encoded(&Frame::new(
            FrameKind::Challenge,
            0,
            vec![9u8; 32],
        )))
        .await
        .unwrap();
        raw.write_all(&encoded(&Frame::new(FrameKind::Response, 0, vec![0u8; 32])))
            .await
            .unwrap();
        let mut wire = encoded(&challenge).to_vec();
        wire.extend_from_slice(&seen);
        raw.read_to_end(&mut wire).await.unwrap();
        wire
    }

    fn assert_secret_absent_but_proof_sent(wire: &[u8]) {
        assert!(
            !wire.windows(SECRET.len()).any(|w| w == SECRET),
            "the pair secret went on the wire"
        );
        let mut buf = BytesMut::from(wire);
        let kinds: Vec<FrameKind> = std::iter::from_fn(|| FrameDecoder.decode(&mut buf).unwrap())
            .map(|f| f.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                FrameKind::Challenge,
                FrameKind::Response,
                FrameKind::Refusal
            ]
        );
    }

    #[tokio::test]
    async fn the_secret_never_goes_on_the_wire() {
        // The connecting side, against a raw accepting peer.
        let raw_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = raw_listener.local_addr().unwrap();
        let connecting = config("node-b", Role::Standby, SECRET);
        let (result, wire) = tokio::time::timeout(WITHIN, async {
            tokio::join!(Link::connect(addr, &connecting), async {
                let (mut raw, _) = raw_listener.accept().await.unwrap();
                capture_against_bogus_prover(&mut raw).await
            })
        })
        .await
        .expect("handshake finished");
        assert!(matches!(
            result,
            Err(LinkError::AuthenticationFailed { .. })
        ));
        assert_secret_absent_but_proof_sent(&wire);

        // The accepting side, against a raw connecting peer.
        let listener = LinkListener::bind("127.0.0.1:0", config("node-a", Role::Primary, SECRET))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let (result, wire) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), async {
                let mut raw = TcpStream::connect(addr).await.unwrap();
                capture_against_bogus_prover(&mut raw).await
            })
        })
        .await
        .expect("handshake finished");
        assert!(matches!(
            result,
            Err(LinkError::AuthenticationFailed { .. })
        ));
        assert_secret_absent_but_proof_sent(&wire);
    }

    fn assert_refused_for(
        result: Result<Link, LinkError>,
        side: &str,
        what: fn(&Mismatch) -> bool,
    ) {
        match result {
            Err(LinkError::Incompatible { mismatch, .. })
            | Err(LinkError::PeerRefused {
                reason: Refusal::Incompatible(mismatch),
                ..
            }) => assert!(
                what(&mismatch),
                "{side}: refused for another reason: {mismatch}"
            ),
            Err(other) => panic!("{side}: wrong error {other}"),
            Ok(_) => panic!("{side}: paired incompatible nodes"),
        }
    }

    #[tokio::test]
    async fn cpu_feature_mismatch_is_refused_on_both_sides() {
        let a = config("node-a", Role::Primary, SECRET);
        let mut b = config("node-b", Role::Standby, SECRET);
        b.hello.cpu.words[1] ^= 1 << 4;
        let (accepted, connected) = pair(a, b).await;
        let is_cpu = |m: &Mismatch| {
            matches!(m, Mismatch::CpuFeatures { differing, .. } if *differing == vec![1])
                && m.to_string().contains("CPU features differ")
        };
        assert_refused_for(accepted, "accepting", is_cpu);
        assert_refused_for(connected, "connecting", is_cpu);
    }

    #[tokio::test]
    async fn vm_fingerprint_mismatch_is_refused_on_both_sides() {
        let a = config("node-a", Role::Primary, SECRET);
        let mut b = config("node-b", Role::Standby, SECRET);
        b.hello.vm_fingerprint = "vm-sha256:beef".into();
        let (accepted, connected) = pair(a, b).await;
        let is_vm = |m: &Mismatch| {
            matches!(m, Mismatch::VmFingerprint { .. }) && m.to_string().contains("vm-sha256:beef")
        };
        assert_refused_for(accepted, "accepting", is_vm);
        assert_refused_for(connected, "connecting", is_vm);
    }

    #[tokio::test]
    async fn a_refusal_from_the_peer_is_reported_with_its_reason() {
        // The raw peer authenticates properly, then refuses instead of
        // sending its Hello: only the peer's refusal can tell the link why.
        let listener = LinkListener::bind("127.0.0.1:0", config("node-a", Role::Primary, SECRET))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let secret = PairSecret::new(SECRET.to_vec()).unwrap();
        let (result, ()) = tokio::time::timeout(WITHIN, async {
            tokio::join!(listener.accept(), async {
                let mut raw = TcpStream::connect(addr).await.unwrap();
                let peer = raw.peer_addr().unwrap();
                let (mut rx, mut dec) = (BytesMut::new(), FrameDecoder);
                let mine = Nonce::fresh().unwrap();
                raw.write_all(&encoded(&Frame::new(
                    FrameKind::Challenge,
                    0,
                    mine.as_bytes().to_vec(),
                )))
                .await
                .unwrap();
                let theirs = read_frame_within(&mut raw, peer, &mut rx, &mut dec, u32::MAX)
                    .await
                    .unwrap();
                let theirs = Nonce::from_wire(&theirs.payload).unwrap();
                let proof = auth::prove(&secret, Side::Connecting, &theirs, &mine);
                raw.write_all(&encoded(&Frame::new(
                    FrameKind::Response,
                    0,
                    proof.to_vec(),
                )))
                .await
                .unwrap();
                let refusal = Refusal::ProtocolViolation("standby disk not ready".into());
                raw.write_all(&encoded(&Frame::new(
                    FrameKind::Refusal,
                    0,
                    refusal.to_payload().unwrap(),
                )))
                .await
                .unwrap();
                raw.shutdown().await.unwrap();
                let mut rest = Vec::new();
                raw.read_to_end(&mut rest).await.unwrap();
            })
        })
        .await
        .expect("handshake finished");
        match result {
            Err(
                err @ LinkError::PeerRefused {
                    reason: Refusal::ProtocolViolation(_),
                    ..
                },
            ) => assert!(err.to_string().contains("standby disk not ready"), "{err}"),
            Err(other) => panic!("wrong error {other}"),
            Ok(_) => panic!("paired with a refusing peer"),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_in_order() {
        let (accepted, connected) = pair(
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        )
        .await;
        let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
        let frames: Vec<Frame> = (1..=50u64)
            .flat_map(|epoch| {
                [
                    Frame::message(64, epoch, 1, vec![epoch as u8; 16]).unwrap(),
                    Frame::message(65, epoch, 1, vec![epoch as u8; 70_000]).unwrap(),
                    Frame::message(66, epoch, 1, Bytes::new()).unwrap(),
                ]
            })
            .collect();
        let sent = frames.clone();
        let sending = tokio::spawn(async move {
            for frame in &sent {
                primary.send(frame).await.unwrap();
            }
            primary
        });
        let mut got = Vec::new();
        for _ in 0..frames.len() {
            got.push(
                tokio::time::timeout(WITHIN, standby.recv())
                    .await
                    .unwrap()
                    .unwrap(),
            );
        }
        assert_eq!(got, frames);
        let primary = sending.await.unwrap();
        // And back.
        let ack = Frame::message(67, 50, 1, Bytes::new()).unwrap();
        standby.send(&ack).await.unwrap();
        let (_, mut primary_rx) = primary.split();
        assert_eq!(
            tokio::time::timeout(WITHIN, primary_rx.recv())
                .await
                .unwrap()
                .unwrap(),
            ack
        );
    }

    #[tokio::test]
    async fn heartbeats_keep_an_idle_link_alive() {
        // Heartbeats every 50 ms against a 600 ms timeout: a wide margin
        // for a loaded machine.
        let (mut a, mut b) = (
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        );
        a.heartbeat_timeout = Duration::from_millis(600);
        b.heartbeat_timeout = Duration::from_millis(600);
        let (accepted, connected) = pair(a, b).await;
        let (primary, mut standby) = (accepted.unwrap(), connected.unwrap());
        // Idle for three heartbeat timeouts: recv must neither return a
        // heartbeat nor declare the peer silent.
        let idle = tokio::time::timeout(Duration::from_millis(1800), standby.recv()).await;
        assert!(
            idle.is_err(),
            "recv returned during an idle period: {idle:?}"
        );
        let frame = Frame::message(64, 1, 1, vec![1, 2, 3]).unwrap();
        primary.send(&frame).await.unwrap();
        assert_eq!(
            tokio::time::timeout(WITHIN, standby.recv())
                .await
                .unwrap()
                .unwrap(),
            frame
        );
    }

    #[tokio::test]
    async fn a_corrupt_frame_ends_the_link_with_a_checksum_error() {
        let (mut link, mut raw) = listener_with_raw_peer().await;
        let mut wire = encoded(&Frame::message(65, 4, 1, vec![0x55u8; 256]).unwrap());
        wire[100] ^= 0x01;
        raw.write_all(&wire).await.unwrap();
        let err = tokio::time::timeout(WITHIN, link.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(
                err,
                LinkError::Corrupt {
                    source: FrameError::Checksum { epoch: 4, .. },
                    ..
                }
            ),
            "{err}"
        );
        assert!(std::error::Error::source(&err)
            .unwrap()
            .to_string()
            .contains("checksum"));
        // Ended: the link closed its direction and refuses further use.
        assert!(matches!(link.recv().await, Err(LinkError::Ended { .. })));
        let mut rest = Vec::new();
        tokio::time::timeout(WITHIN, raw.read_to_end(&mut rest))
            .await
            .expect("the link closed its sending direction")
            .unwrap();
    }

    #[tokio::test]
    async fn a_silent_peer_is_detected_within_the_timeout() {
        let (mut link, _raw_kept_open) = listener_with_raw_peer().await;
        let started = Instant::now();
        let err = tokio::time::timeout(WITHIN, link.recv())
            .await
            .expect("silence detected within the bound")
            .unwrap_err();
        match err {
            LinkError::PeerSilent { after, .. } => {
                assert!(
                    after >= Duration::from_millis(300),
                    "declared silent after {after:?}"
                );
                assert!(started.elapsed() < Duration::from_secs(2));
            }
            other => panic!("wrong error {other}"),
        }
    }

    #[tokio::test]
    async fn a_peer_that_closes_gives_peer_closed() {
        let (accepted, connected) = pair(
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        )
        .await;
        let mut primary = accepted.unwrap();
        drop(connected.unwrap());
        let err = tokio::time::timeout(WITHIN, primary.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, LinkError::PeerClosed { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_stream_ending_inside_a_frame_is_truncated() {
        let (mut link, mut raw) = listener_with_raw_peer().await;
        let wire = encoded(&Frame::message(65, 2, 1, vec![1u8; 100]).unwrap());
        raw.write_all(&wire[..60]).await.unwrap();
        drop(raw);
        let err = tokio::time::timeout(WITHIN, link.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(
            matches!(err, LinkError::Truncated { received: 60, .. }),
            "{err}"
        );
    }

    /// The far end of a link on a runtime that runs nothing for `busy`
    /// after the handshake (a node whose CPUs the guest takes), then sends
    /// one message; what the near end's `recv` gives.
    fn recv_from_a_starved_peer(pulses: bool, busy: Duration) -> Result<Frame, LinkError> {
        let mut near = config("node-a", Role::Standby, SECRET);
        near.pulses = pulses;
        let mut far = config("node-b", Role::Primary, SECRET);
        far.pulses = pulses;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let listener = runtime
            .block_on(LinkListener::bind("127.0.0.1:0", near))
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let starved = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let link = Link::connect(addr, &far).await.unwrap();
                // Busy: this runtime (its heartbeat task included) runs
                // nothing for a while.
                std::thread::sleep(busy);
                let after = Frame::message(64, 1, 0, Bytes::from_static(b"after")).unwrap();
                let _ = link.send(&after).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            });
        });
        let result = runtime.block_on(async {
            let mut link = listener.accept().await.unwrap();
            tokio::time::timeout(WITHIN, link.recv()).await.unwrap()
        });
        starved.join().unwrap();
        result
    }

    /// Issue 12: heartbeats queued on a starved runtime let a live peer be
    /// declared silent (the control below); pulses come from a thread of
    /// their own and keep it alive.
    #[test]
    fn pulses_keep_a_starved_peer_alive() {
        let busy = Duration::from_millis(1200);
        let frame = recv_from_a_starved_peer(true, busy).expect("alive through its pulses");
        assert_eq!(&frame.payload[..], b"after");
        let silent = recv_from_a_starved_peer(false, busy);
        assert!(
            matches!(silent, Err(LinkError::PeerSilent { .. })),
            "without pulses a starved peer is declared silent: {silent:?}"
        );
    }

    #[tokio::test]
    async fn a_dead_peers_pulses_stop_and_it_is_declared_silent() {
        let (accepted, connected) = pair(
            config("node-a", Role::Primary, SECRET),
            config("node-b", Role::Standby, SECRET),
        )
        .await;
        let mut near = accepted.unwrap();
        let far = connected.unwrap();
        // The far end's process freezes: its pulses and heartbeats stop,
        // its socket stays open.
        let (far_tx, _far_rx) = far.split();
        far_tx.heartbeats.abort();
        far_tx.pulses.lock().unwrap().take();
        let started = std::time::Instant::now();
        let err = tokio::time::timeout(WITHIN, near.recv())
            .await
            .unwrap()
            .unwrap_err();
        assert!(matches!(err, LinkError::PeerSilent { .. }), "{err}");
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "{:?}",
            started.elapsed()
        );
    }
}
