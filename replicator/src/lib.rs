//! The FT engine.
//!
//! - [`epoch`]: how a checkpoint travels (state, dirty pages, disk writes,
//!   an end record that makes a torn epoch detectable).
//! - [`checkpoint`]: the state and synchronisation plan payloads.
//! - [`standby`]: assembling frames into complete, checked epochs and
//!   applying them atomically, in sequence.
//! - [`primary`]: initial synchronisation and the epoch loop with output
//!   commit (network frames released per acknowledged epoch, disk writes
//!   shipped with their epoch) and the adaptive interval ([`interval`]).
//! - [`replica`]: the standby process around the assembler; [`replica_disk`]
//!   its disk files.
//! - [`promote`]: turning the replica into the running VM after a failure;
//!   [`bridge`] puts its TAP on the node's bridge.
//! - [`pairing`]: what the nodes tell each other when the A-link opens.
//! - [`status`]: the state and counters each node publishes;
//!   [`control`] serves them (and takes a stop) on a Unix socket.
//! - [`stats`]: percentiles (nearest rank) of recent samples.

pub mod bridge;
pub mod checkpoint;
pub mod control;
pub mod epoch;
pub mod interval;
pub mod pairing;
pub mod primary;
pub mod promote;
pub mod replica;
pub mod replica_disk;
pub mod standby;
pub mod stats;
pub mod status;
