//! The FT engine.
//!
//! - [`protocol`]: every message between primary and standby, typed, with
//!   its codec (epoch state, dirty pages, disk writes, the end record that
//!   makes a torn epoch detectable; the synchronisation plan).
//! - [`level`]: the protection levels (ft: checkpoints; ha: disks
//!   mirrored synchronously, the VM rebooted on the survivor).
//! - [`primary`]: initial synchronisation and the epoch loop with output
//!   commit (network frames released per acknowledged epoch, disk writes
//!   shipped with their epoch) and the adaptive interval ([`interval`]).
//! - [`standby`]: the standby's sessions; [`assembler`] turns messages
//!   into complete, checked epochs and applies them atomically, in
//!   sequence ([`sequence`]).
//! - [`promote`]: turning the replica into the running VM after a failure;
//!   [`bridge`] puts its TAP on the node's bridge.
//! - [`pairing`]: what the nodes tell each other when the A-link opens.
//! - [`quorum`]: the witness that decides which copy may run (the
//!   primary's lease, the standby's claim).
//! - [`status`]: the state and counters each node publishes;
//!   [`control`] serves them (and takes a stop) on a Unix socket.
//! - [`content`]: keyed digests of disk chunks and memory pages, so that a
//!   resynchronisation moves only what a returning standby does not
//!   already hold; [`written`]: the written maps that let it compare only
//!   the extents either node wrote since the two last matched;
//!   [`memory_point`]: the label that lets it bring a returning standby's
//!   memory forward by the pages written since its last checkpoint.
//! - [`stats`]: percentiles (nearest rank) of recent samples.
//! - [`checkpoint_bench`]: the checkpoint stop-time benchmark.
//! - [`heap`]: the allocator kept from faulting in fresh pages for every
//!   epoch's buffers.
//!
//! How a checkpoint flows (one dirty page, from harvest to apply):
//! 1. `primary/checkpoint.rs` `capture`: with the guest paused, asks the
//!    VMM to harvest the dirty pages into a [`protocol::PageStager`];
//! 2. `vmm/src/replication/mod.rs` `Vm::harvest_dirty_into`: reads KVM's
//!    dirty log merged with the VMM's own bitmap and copies each page into
//!    the buffer the stager hands out;
//! 3. `protocol/pages.rs` `PageStager`: writes the page record (address,
//!    contents) into a frame payload;
//! 4. `protocol/mod.rs` `epoch_frames`: wraps the payloads as `Pages`
//!    messages between `EpochBegin` and the checking `EpochEnd`; the
//!    A-link carries them; on the standby `Message::from_frame` decodes;
//! 5. `assembler.rs` `EpochAssembler`: stages the epoch, checks it against
//!    its end record, checks every page range, and writes the pages into
//!    the replica's RAM.

pub mod assembler;
pub mod bridge;
pub mod checkpoint_bench;
pub mod content;
pub mod control;
pub mod heap;
pub mod interval;
pub mod level;
pub mod memory_point;
pub mod oracle;
pub mod pairing;
pub mod primary;
pub mod promote;
pub mod protocol;
pub mod quorum;
pub mod sequence;
pub mod standby;
pub mod stats;
pub mod status;
mod workers;
pub mod written;

/// The least silence that ends a session before its first committed epoch
/// (on both sides): a silence then cannot lead to a takeover, but restarts
/// a copy that may have run for a long while, under the heaviest load both
/// nodes see (a lab node was seen stalling past 200 ms in it).
pub(crate) const SYNC_SILENCE: std::time::Duration = std::time::Duration::from_secs(1);
