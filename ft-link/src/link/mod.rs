//! The A-link transport: one TCP connection between the two nodes, opened by
//! an authenticated handshake, carrying checked frames, kept alive by
//! heartbeats.
//!
//! Handshake (every frame has epoch 0), run identically by both sides:
//! 1. `Challenge` with a fresh nonce; read the peer's `Challenge`.
//! 2. `Response` with our proof ([`auth::prove`](crate::auth::prove)); read
//!    the peer's `Response` and verify it. A failed proof: `Refusal` and stop.
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
//!
//! The files of this module, one job each:
//! - `mod.rs`: [`Link`] (connect, establish, send, receive, split into
//!   halves);
//! - `arrival.rs`: reading the connection with the kernel's arrival stamps
//!   (a link with pulses counts bytes as heard when they arrived);
//! - `config.rs`: [`LinkConfig`], the timeout defaults and
//!   [`heartbeat_interval_for`], [`send_stall_timeout_for`];
//! - `error.rs`: [`LinkError`];
//! - `handshake.rs`: the handshake (authentication, hello, pulse offer) and
//!   reading checked frames off the stream;
//! - `listener.rs`: [`LinkListener`], which runs each accepted connection's
//!   handshake in a task of its own;
//! - `sender.rs`: [`LinkSender`], the bounded writer and the heartbeat task;
//! - `receiver.rs`: [`LinkReceiver`] and [`Liveness`] (silent-peer
//!   detection);
//! - `tests.rs` (tests only): helpers the tests of every file share, and
//!   the tests of [`Link`] as a whole.

mod arrival;
mod config;
mod error;
mod handshake;
mod listener;
mod receiver;
mod sender;
mod stream;

pub use config::{
    heartbeat_interval_for, send_stall_timeout_for, LinkConfig, DEFAULT_HANDSHAKE_TIMEOUT,
    DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_HEARTBEAT_TIMEOUT, MIN_HEARTBEAT_INTERVAL,
    MIN_SEND_STALL_TIMEOUT,
};
pub use error::LinkError;
pub use listener::{LinkListener, MAX_PENDING_HANDSHAKES};
pub use receiver::{LinkReceiver, Liveness};
pub use sender::LinkSender;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpStream, ToSocketAddrs};
use tokio::sync::Mutex;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::auth::Side;
use crate::frame::Frame;
use crate::hello::Hello;
use crate::pulse::{PulseConfig, PulseSocket, Pulses};
use crate::seal::Protection;

use handshake::handshake_with;
use sender::{send_heartbeats, Writer};

/// An established A-link.
pub struct Link {
    peer_hello: Hello,
    protection: Protection,
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
        let peer_hello = done.hello;
        let protection = if done.outbound.sealer.is_some() {
            Protection::Sealed
        } else {
            Protection::Plaintext
        };
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
            protection = protection.name(),
            "A-link established"
        );
        // With pulses, bytes count as heard when they arrived (see
        // `arrival`); without, when read.
        let stamped = match pulses {
            Some(_) => arrival::stamp_arrivals(&stream)
                .map(|()| arrival::ArrivalClock::new())
                .map_err(|error| warn!(%peer, %error, "no arrival stamps: bytes heard when read"))
                .ok(),
            None => None,
        };
        let (read_half, write_half) = stream.into_split();
        let writer = Arc::new(Mutex::new(Writer {
            half: write_half,
            last_sent: Instant::now(),
            outbound: done.outbound,
            stall: config.send_stall_timeout,
            unsent: Default::default(),
        }));
        let heartbeats = tokio::spawn(send_heartbeats(
            writer.clone(),
            peer,
            config.heartbeat_interval,
        ));
        Ok(Link {
            peer_hello,
            protection,
            sender: LinkSender {
                peer,
                writer,
                heartbeats,
                pulses: std::sync::Mutex::new(pulses),
            },
            receiver: LinkReceiver {
                peer,
                reader: read_half,
                inbound: done.inbound,
                liveness,
                silence_timeout: config.heartbeat_timeout,
                stamped,
                read_grace: config.heartbeat_interval,
                last_read: Instant::now(),
                ended: false,
            },
        })
    }

    /// Whether the link is sealed (see [`crate::seal`]).
    pub fn protection(&self) -> Protection {
        self.protection
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

    /// From now on the peer is silent after `timeout` (a session may allow
    /// more while a silence could not lead to a takeover anyway).
    pub fn set_silence_timeout(&mut self, timeout: std::time::Duration) {
        self.receiver.set_silence_timeout(timeout);
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

#[cfg(test)]
mod tests;
