//! A fault-injection relay for the A-link, for host tests and the lab.
//!
//! [`Relay`] is a TCP proxy (listen address to target, any number of
//! connections, each with its own connection to the target) that knows
//! where A-link frames begin and end ([`wire`]) and, on request through
//! its [`RelayHandle`], does to one direction (primary to standby is
//! [`Direction::Up`]) what a bad network or a dying peer does: a delay, a
//! stall, a reset, a FIN, a flipped byte (header fields included), a
//! dropped, duplicated or reordered frame ([`Fault`]), on any frame or only
//! on frames of a chosen kind ([`fault::kind`]: "drop the next
//! EpochEnd"). Without a fault the stream goes on byte for byte.
//!
//! - [`wire`]: cutting the stream into frames without checking payloads;
//! - [`fault`]: directions, faults, frame kinds by name;
//! - [`relay`]: the relay, its handle and counters;
//! - [`command`], [`control`]: the text commands of `ftrelay`'s control
//!   socket.
//!
//! ```no_run
//! # async fn f(standby: std::net::SocketAddr) -> Result<(), fault_relay::RelayError> {
//! use fault_relay::{kind, Direction, Fault, Relay};
//! let relay = Relay::start("127.0.0.1:0", standby).await?;
//! // The primary connects to relay.local_addr() instead of the standby.
//! relay.handle().inject_on(Direction::Up, Fault::Drop, kind::EPOCH_END)?;
//! # Ok(()) }
//! ```

pub mod command;
pub mod control;
pub mod fault;
pub mod relay;
pub mod wire;

pub use command::{Command, CommandError};
pub use control::{ControlError, ControlSocket};
pub use fault::{frame_kind_name, frame_kind_named, kind, Direction, Fault};
pub use relay::{Counters, DirectionCounters, Relay, RelayError, RelayHandle};
pub use wire::{FrameSplitter, Piece, WireError};
