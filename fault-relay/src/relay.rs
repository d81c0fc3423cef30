//! The relay: a TCP proxy from a listen address to a target, each accepted
//! connection with its own connection to the target, that cuts both
//! directions into frames ([`crate::wire`]) and applies the faults injected
//! through a [`RelayHandle`].
//!
//! Each connection runs four pumps: for each direction a receiver (reads
//! the sender's socket, cuts frames, applies the frame faults) and a
//! forwarder (holds frames for a delay or a stall, writes them to the
//! receiver's socket, runs what a fault asked for after a frame). A
//! bounded queue between them passes the sender's pace on, as a cable
//! would. Without faults every byte goes on unchanged and in order.
//!
//! Faults are the relay's, not a connection's: a pending frame fault
//! applies to the first matching frame on any connection, a stall or a
//! delay to all of them, an at-once reset or FIN to every open one.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ft_link::FrameKind;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, ToSocketAddrs};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::fault::{frame_kind_name, Direction, Fault};
use crate::wire::{self, FrameSplitter, Piece};

/// Frames (or unframed chunks) queued between a direction's receiver and
/// its forwarder; past this the receiver stops reading.
const QUEUE_FRAMES: usize = 256;
/// Room made in a receive buffer before each read.
const READ_ROOM: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("could not bind the relay to {addr}")]
    Bind {
        addr: String,
        #[source]
        source: io::Error,
    },
    #[error("connection {connection}: could not connect to the target {target}")]
    ConnectTarget {
        connection: u64,
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("connection {connection}: could not receive ({direction})")]
    Receive {
        connection: u64,
        direction: Direction,
        #[source]
        source: io::Error,
    },
    #[error("connection {connection}: could not forward ({direction})")]
    Forward {
        connection: u64,
        direction: Direction,
        #[source]
        source: io::Error,
    },
    #[error("{fault} takes no frame kind (it applies to every frame, or at once)")]
    KindNotApplicable { fault: &'static str },
    #[error("flipping byte {offset} with a zero mask would change nothing")]
    ZeroMask { offset: usize },
}

/// A running relay. Dropping it stops it: no more connections are
/// accepted and the open ones are closed.
pub struct Relay {
    handle: RelayHandle,
    acceptor: JoinHandle<()>,
}

/// Drives a relay: injects faults, reads its counters. Cheap to clone.
#[derive(Clone)]
pub struct RelayHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for RelayHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RelayHandle")
            .field("listen", &self.shared.local)
            .field("target", &self.shared.target)
            .finish()
    }
}

struct Shared {
    local: SocketAddr,
    target: String,
    up: DirectionState,
    down: DirectionState,
    /// The open connections, by number.
    connections: Mutex<HashMap<u64, Arc<ConnectionControl>>>,
    accepted: AtomicU64,
}

impl Shared {
    fn direction(&self, direction: Direction) -> &DirectionState {
        match direction {
            Direction::Up => &self.up,
            Direction::Down => &self.down,
            Direction::Both => unreachable!("a connection's direction is up or down"),
        }
    }

    fn connections(&self) -> MutexGuard<'_, HashMap<u64, Arc<ConnectionControl>>> {
        self.connections.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// One direction, relay-wide: its pending frame faults, its flow (delay,
/// stall) and its counters.
struct DirectionState {
    direction: Direction,
    pending: Mutex<VecDeque<Pending>>,
    flow: watch::Sender<Flow>,
    frames: AtomicU64,
    bytes: AtomicU64,
    faults: AtomicU64,
    unframed_bytes: AtomicU64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Flow {
    delay: Duration,
    stalled: bool,
}

/// A fault waiting for its frame.
#[derive(Debug, Clone, Copy)]
struct Pending {
    fault: Fault,
    only: Option<FrameKind>,
}

impl DirectionState {
    fn new(direction: Direction) -> DirectionState {
        DirectionState {
            direction,
            pending: Mutex::default(),
            flow: watch::Sender::new(Flow::default()),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            unframed_bytes: AtomicU64::new(0),
        }
    }

    fn pending(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn applied(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes the pending faults that apply to `frame`, in the order they
    /// were injected. A frame has at most one fate (dropped, duplicated or
    /// held back); a second one waits for the next matching frame, and so
    /// does a reorder while a frame is already held.
    fn take_faults(&self, frame: &[u8], holding: bool) -> Vec<Fault> {
        let code = wire::kind_code(frame);
        let mut taken = Vec::new();
        let mut fated = false;
        self.pending().retain(|p| {
            let applies = p.only.is_none_or(|k| k.code() == code)
                && match p.fault {
                    Fault::FlipByte { offset, .. } | Fault::Rewrite { offset, .. } => {
                        offset < frame.len()
                    }
                    Fault::Drop | Fault::Duplicate => !fated,
                    Fault::Reorder => !fated && !holding,
                    _ => true,
                };
            if applies {
                fated |= matches!(p.fault, Fault::Drop | Fault::Duplicate | Fault::Reorder);
                taken.push(p.fault);
            }
            !applies
        });
        self.faults.fetch_add(taken.len() as u64, Ordering::Relaxed);
        taken
    }

    fn counters(&self) -> DirectionCounters {
        let flow = *self.flow.borrow();
        DirectionCounters {
            frames: self.frames.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
            faults: self.faults.load(Ordering::Relaxed),
            pending: self.pending().len(),
            unframed_bytes: self.unframed_bytes.load(Ordering::Relaxed),
            delay: flow.delay,
            stalled: flow.stalled,
        }
    }
}

/// What the handle tells one connection.
struct ConnectionControl {
    id: u64,
    /// Set: both sockets are closed with SO_LINGER 0.
    reset: watch::Sender<bool>,
    /// Set: FIN towards the receiver of that direction.
    fin_up: watch::Sender<bool>,
    fin_down: watch::Sender<bool>,
}

impl ConnectionControl {
    fn new(id: u64) -> ConnectionControl {
        ConnectionControl {
            id,
            reset: watch::Sender::new(false),
            fin_up: watch::Sender::new(false),
            fin_down: watch::Sender::new(false),
        }
    }

    fn fin(&self, direction: Direction) -> &watch::Sender<bool> {
        match direction {
            Direction::Up => &self.fin_up,
            Direction::Down => &self.fin_down,
            Direction::Both => unreachable!("a connection's direction is up or down"),
        }
    }
}

/// The relay's counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    /// Connections accepted since the start.
    pub connections: u64,
    /// Connections open now.
    pub open: usize,
    pub up: DirectionCounters,
    pub down: DirectionCounters,
}

/// One direction's counters and flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirectionCounters {
    /// Frames forwarded (a duplicated frame counts twice, a dropped one not).
    pub frames: u64,
    /// Bytes forwarded (unframed ones included).
    pub bytes: u64,
    /// Faults applied (each frame fault once, on its frame; each stall,
    /// delay, reset or FIN once).
    pub faults: u64,
    /// Frame faults waiting for their frame.
    pub pending: usize,
    /// Bytes passed on without framing (a stream that is not A-link
    /// frames).
    pub unframed_bytes: u64,
    pub delay: Duration,
    pub stalled: bool,
}

impl fmt::Display for Counters {
    /// One line of `key=value` words (what `ftrelay`'s `counters` answers).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "connections={} open={}", self.connections, self.open)?;
        for (name, c) in [("up", &self.up), ("down", &self.down)] {
            write!(
                f,
                " {name}.frames={} {name}.bytes={} {name}.faults={} {name}.pending={} \
                 {name}.unframed_bytes={} {name}.delay_ms={} {name}.stalled={}",
                c.frames,
                c.bytes,
                c.faults,
                c.pending,
                c.unframed_bytes,
                c.delay.as_millis(),
                c.stalled
            )?;
        }
        Ok(())
    }
}

impl Relay {
    /// Listens on `listen` and relays each connection to `target` (an
    /// address `host:port`, looked up at each connection).
    pub async fn start(
        listen: impl ToSocketAddrs + fmt::Debug,
        target: impl fmt::Display,
    ) -> Result<Relay, RelayError> {
        let shown = format!("{listen:?}");
        let bind_err = |source| RelayError::Bind {
            addr: shown.clone(),
            source,
        };
        let listener = TcpListener::bind(listen).await.map_err(bind_err)?;
        let local = listener.local_addr().map_err(bind_err)?;
        let shared = Arc::new(Shared {
            local,
            target: target.to_string(),
            up: DirectionState::new(Direction::Up),
            down: DirectionState::new(Direction::Down),
            connections: Mutex::default(),
            accepted: AtomicU64::new(0),
        });
        info!(listen = %local, target = %shared.target, "fault relay started");
        let acceptor = tokio::spawn(accept_connections(Arc::clone(&shared), listener));
        Ok(Relay {
            handle: RelayHandle { shared },
            acceptor,
        })
    }

    pub fn handle(&self) -> &RelayHandle {
        &self.handle
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.acceptor.abort();
    }
}

impl RelayHandle {
    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    pub fn target(&self) -> &str {
        &self.shared.target
    }

    /// Injects `fault` on any frame (or at once), see [`Fault`].
    pub fn inject(&self, direction: Direction, fault: Fault) -> Result<(), RelayError> {
        self.inject_matching(direction, fault, None)
    }

    /// Injects `fault` on the next frame of kind `only`: a frame fault on
    /// that frame; a reset, FIN or stall right after it is forwarded.
    pub fn inject_on(
        &self,
        direction: Direction,
        fault: Fault,
        only: FrameKind,
    ) -> Result<(), RelayError> {
        self.inject_matching(direction, fault, Some(only))
    }

    /// [`inject`](Self::inject) or, with a kind, [`inject_on`](Self::inject_on).
    pub fn inject_matching(
        &self,
        direction: Direction,
        fault: Fault,
        only: Option<FrameKind>,
    ) -> Result<(), RelayError> {
        match (fault, only) {
            (Fault::Delay(_) | Fault::Resume, Some(_)) => {
                return Err(RelayError::KindNotApplicable {
                    fault: fault.name(),
                })
            }
            (Fault::FlipByte { offset, mask: 0 } | Fault::Rewrite { offset, mask: 0 }, _) => {
                return Err(RelayError::ZeroMask { offset })
            }
            _ => {}
        }
        for &d in direction.each() {
            let state = self.shared.direction(d);
            let only_name = only.map(|k| frame_kind_name(k.code()));
            match (fault, only) {
                (Fault::Delay(delay), _) => {
                    state.flow.send_modify(|f| f.delay = delay);
                    state.applied();
                }
                (Fault::Stall, None) => {
                    state.flow.send_modify(|f| f.stalled = true);
                    state.applied();
                }
                (Fault::Resume, _) => state.flow.send_modify(|f| f.stalled = false),
                (Fault::Reset, None) => {
                    for c in self.shared.connections().values() {
                        c.reset.send_replace(true);
                    }
                    state.applied();
                }
                (Fault::Fin, None) => {
                    for c in self.shared.connections().values() {
                        c.fin(d).send_replace(true);
                    }
                    state.applied();
                }
                _ => state.pending().push_back(Pending { fault, only }),
            }
            info!(direction = %d, %fault, only = ?only_name, "fault injected");
        }
        Ok(())
    }

    /// Back to a faultless relay: pending faults forgotten, no delay, no
    /// stall (a FIN or a reset already done stays done).
    pub fn clear(&self) {
        for d in [&self.shared.up, &self.shared.down] {
            d.pending().clear();
            d.flow.send_replace(Flow::default());
        }
        info!("faults cleared");
    }

    pub fn counters(&self) -> Counters {
        Counters {
            connections: self.shared.accepted.load(Ordering::Relaxed),
            open: self.shared.connections().len(),
            up: self.shared.up.counters(),
            down: self.shared.down.counters(),
        }
    }
}

async fn accept_connections(shared: Arc<Shared>, listener: TcpListener) {
    // Owned here: when the relay stops, its connections go with it.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((client, from)) => {
                    let id = shared.accepted.fetch_add(1, Ordering::Relaxed) + 1;
                    connections.spawn(relay_connection(Arc::clone(&shared), id, client, from));
                }
                Err(error) => {
                    warn!(%error, "could not accept a connection");
                    // E.g. out of file descriptors: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

/// Removes a connection from the relay's list when it ends (or is
/// aborted).
struct Registered<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        self.shared.connections().remove(&self.id);
    }
}

/// Closing this socket (its last handle) resets the connection.
fn linger_zero(stream: &TcpStream, connection: u64) {
    if let Err(error) = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO)) {
        warn!(connection, %error, "could not set SO_LINGER 0: the close may not reset");
    }
}

async fn relay_connection(shared: Arc<Shared>, id: u64, client: TcpStream, from: SocketAddr) {
    let control = Arc::new(ConnectionControl::new(id));
    shared.connections().insert(id, Arc::clone(&control));
    let _registered = Registered {
        shared: &shared,
        id,
    };
    let target = match TcpStream::connect(&shared.target).await {
        Ok(target) => target,
        Err(source) => {
            let error = RelayError::ConnectTarget {
                connection: id,
                target: shared.target.clone(),
                source,
            };
            warn!(%error, %from, "connection refused: reset");
            linger_zero(&client, id);
            return;
        }
    };
    // As the A-link's own sockets: no Nagle delay added by the relay.
    let _ = client.set_nodelay(true);
    let _ = target.set_nodelay(true);
    info!(connection = id, %from, target = %shared.target, "connection relayed");
    let (mut client_rx, mut client_tx) = client.into_split();
    let (mut target_rx, mut target_tx) = target.into_split();
    let (up_tx, up_rx) = mpsc::channel(QUEUE_FRAMES);
    let (down_tx, down_rx) = mpsc::channel(QUEUE_FRAMES);
    let mut reset = control.reset.subscribe();
    let pumps = async {
        tokio::join!(
            receive(&shared, &control, Direction::Up, &mut client_rx, up_tx),
            forward(&shared, &control, Direction::Up, &mut target_tx, up_rx),
            receive(&shared, &control, Direction::Down, &mut target_rx, down_tx),
            forward(&shared, &control, Direction::Down, &mut client_tx, down_rx),
        )
    };
    let was_reset = tokio::select! {
        _ = pumps => false,
        _ = reset.wait_for(|r| *r) => true,
    };
    if was_reset {
        linger_zero(client_rx.as_ref(), id);
        linger_zero(target_rx.as_ref(), id);
        // A dropped write half would send a FIN first: the peers would
        // read the end of the stream before the reset.
        client_tx.forget();
        target_tx.forget();
        info!(
            connection = id,
            "connection reset (both sockets closed with SO_LINGER 0)"
        );
    } else {
        info!(connection = id, "connection ended");
    }
}

/// What a forwarder does after a frame is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Then {
    Reset,
    Fin,
    Stall,
}

/// A piece on its way to the receiver.
#[derive(Debug)]
struct Outgoing {
    /// Empty for an action alone (the fault's frame was dropped).
    bytes: Bytes,
    /// When its last byte arrived (its delay counts from there).
    arrived: Instant,
    /// Whether these bytes are a frame.
    frame: bool,
    then: Option<Then>,
}

/// A direction's frame faults on one connection (what a reorder holds
/// back).
#[derive(Default)]
struct FrameFaults {
    held: Option<Vec<Outgoing>>,
}

impl FrameFaults {
    /// What goes on for one received frame, its faults applied.
    fn on_frame(
        &mut self,
        state: &DirectionState,
        connection: u64,
        mut frame: Bytes,
        arrived: Instant,
    ) -> Vec<Outgoing> {
        let code = wire::kind_code(&frame);
        let faults = state.take_faults(&frame, self.held.is_some());
        let (mut copies, mut hold, mut then) = (1, false, None);
        for fault in &faults {
            info!(
                connection,
                direction = %state.direction,
                %fault,
                kind = %frame_kind_name(code),
                epoch = wire::epoch(&frame),
                len = frame.len(),
                "fault applied"
            );
            match *fault {
                Fault::FlipByte { offset, mask } => {
                    let mut flipped = BytesMut::from(&frame[..]);
                    flipped[offset] ^= mask;
                    frame = flipped.freeze();
                }
                Fault::Rewrite { offset, mask } => {
                    let mut rewritten = BytesMut::from(&frame[..]);
                    rewritten[offset] ^= mask;
                    wire::recompute_checks(&mut rewritten);
                    frame = rewritten.freeze();
                }
                Fault::Drop => copies = 0,
                Fault::Duplicate => copies = 2,
                Fault::Reorder => hold = true,
                Fault::Reset => then = Some(Then::Reset),
                Fault::Fin => then = Some(Then::Fin),
                Fault::Stall => then = Some(Then::Stall),
                Fault::Delay(_) | Fault::Resume => unreachable!("never pending"),
            }
        }
        let mut out: Vec<Outgoing> = (0..copies)
            .map(|_| Outgoing {
                bytes: frame.clone(),
                arrived,
                frame: true,
                then: None,
            })
            .collect();
        if then.is_some() {
            match out.last_mut() {
                Some(last) => last.then = then,
                None => out.push(Outgoing {
                    bytes: Bytes::new(),
                    arrived,
                    frame: false,
                    then,
                }),
            }
        }
        if hold {
            self.held = Some(out);
            return Vec::new();
        }
        let heartbeat = code == FrameKind::Heartbeat.code();
        match self.held.take() {
            // A heartbeat passes in its place; the held frame waits for
            // the next frame that is not one.
            Some(held) if heartbeat && !held_is_heartbeat(&held) => {
                self.held = Some(held);
                out
            }
            Some(held) => {
                out.extend(held);
                out
            }
            None => out,
        }
    }

    /// At the end of the stream: a frame still held goes on.
    fn release(&mut self) -> Vec<Outgoing> {
        self.held.take().unwrap_or_default()
    }
}

fn held_is_heartbeat(held: &[Outgoing]) -> bool {
    held.first()
        .is_some_and(|o| o.frame && wire::kind_code(&o.bytes) == FrameKind::Heartbeat.code())
}

/// A direction's receiver: reads the sender, cuts frames, applies the
/// frame faults, queues what goes on. Its end (the sender's FIN) ends the
/// queue, and the forwarder passes the FIN on.
async fn receive(
    shared: &Shared,
    control: &ConnectionControl,
    direction: Direction,
    from: &mut OwnedReadHalf,
    queue: mpsc::Sender<Outgoing>,
) {
    let state = shared.direction(direction);
    let connection = control.id;
    let mut flow = state.flow.subscribe();
    let fin = control.fin(direction).subscribe();
    let mut splitter = FrameSplitter::default();
    let mut faults = FrameFaults::default();
    loop {
        // A stalled direction reads nothing: the sender's buffers fill as
        // behind an unplugged cable.
        if flow.wait_for(|f| !f.stalled).await.is_err() {
            return;
        }
        let buffer = splitter.buffer();
        if buffer.capacity() - buffer.len() < READ_ROOM / 4 {
            buffer.reserve(READ_ROOM);
        }
        match from.read_buf(buffer).await {
            Ok(0) => break,
            Ok(_) => {}
            Err(source) => {
                let error = RelayError::Receive {
                    connection,
                    direction,
                    source,
                };
                info!(%error, "the connection is reset");
                control.reset.send_replace(true);
                return;
            }
        }
        let arrived = Instant::now();
        if *fin.borrow() {
            // After a FIN towards the receiver: discarded.
            splitter.buffer().clear();
            continue;
        }
        loop {
            let piece = match splitter.next_piece() {
                Ok(Some(piece)) => piece,
                Ok(None) => break,
                Err(error) => {
                    warn!(connection, %direction, %error, "not A-link frames: passed on unframed from here, frame faults wait");
                    continue;
                }
            };
            let out = match piece {
                Piece::Frame(frame) => faults.on_frame(state, connection, frame, arrived),
                Piece::Unframed(bytes) => {
                    state
                        .unframed_bytes
                        .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                    vec![Outgoing {
                        bytes,
                        arrived,
                        frame: false,
                        then: None,
                    }]
                }
            };
            for o in out {
                if queue.send(o).await.is_err() {
                    return;
                }
            }
        }
    }
    debug!(connection, %direction, "the sender ended its stream");
    let arrived = Instant::now();
    let mut rest = faults.release();
    if let Some(torn) = splitter.finish() {
        rest.push(Outgoing {
            bytes: torn,
            arrived,
            frame: false,
            then: None,
        });
    }
    for o in rest {
        if queue.send(o).await.is_err() {
            return;
        }
    }
}

/// A direction's forwarder: writes what the receiver queued once its
/// delay passed and no stall holds it; passes the end of the stream on as
/// a FIN, or sends a FIN when told to.
async fn forward(
    shared: &Shared,
    control: &ConnectionControl,
    direction: Direction,
    to: &mut OwnedWriteHalf,
    mut queue: mpsc::Receiver<Outgoing>,
) {
    let state = shared.direction(direction);
    let connection = control.id;
    let mut flow = state.flow.subscribe();
    let mut fin = control.fin(direction).subscribe();
    let finned = loop {
        let item = tokio::select! {
            biased;
            _ = fin.wait_for(|f| *f) => break true,
            item = queue.recv() => match item {
                Some(item) => item,
                None => break false,
            },
        };
        let delivered = tokio::select! {
            biased;
            _ = fin.wait_for(|f| *f) => break true,
            delivered = deliver(state, &mut flow, to, &item) => delivered,
        };
        if let Err(source) = delivered {
            let error = RelayError::Forward {
                connection,
                direction,
                source,
            };
            info!(%error, "the connection is reset");
            control.reset.send_replace(true);
            return;
        }
        match item.then {
            None => {}
            Some(Then::Reset) => {
                info!(connection, %direction, "resetting the connection after the frame");
                control.reset.send_replace(true);
                return;
            }
            Some(Then::Fin) => break true,
            Some(Then::Stall) => {
                info!(connection, %direction, "stalling after the frame");
                state.flow.send_modify(|f| f.stalled = true);
            }
        }
    };
    if let Err(error) = to.shutdown().await {
        debug!(connection, %direction, %error, "could not pass the end of the stream on");
    }
    if finned {
        control.fin(direction).send_replace(true);
        info!(connection, %direction, "FIN sent to the receiver; what follows is discarded");
        while queue.recv().await.is_some() {}
    } else {
        debug!(connection, %direction, "end of the stream passed on");
    }
}

/// Writes one piece once the flow lets it go.
async fn deliver(
    state: &DirectionState,
    flow: &mut watch::Receiver<Flow>,
    to: &mut OwnedWriteHalf,
    item: &Outgoing,
) -> io::Result<()> {
    loop {
        let now = *flow.borrow_and_update();
        if now.stalled {
            if flow.changed().await.is_err() {
                break;
            }
            continue;
        }
        let due = item.arrived + now.delay;
        if Instant::now() >= due {
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = flow.changed() => {}
        }
    }
    if item.bytes.is_empty() {
        return Ok(());
    }
    to.write_all(&item.bytes).await?;
    if item.frame {
        state.frames.fetch_add(1, Ordering::Relaxed);
    }
    state
        .bytes
        .fetch_add(item.bytes.len() as u64, Ordering::Relaxed);
    Ok(())
}
