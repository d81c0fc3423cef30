//! The FT engine.
//!
//! Built so far: how an epoch (a checkpoint) travels and lands. [`epoch`]
//! turns a checkpoint (device/vCPU state bytes and the staged dirty pages)
//! into A-link frames, and [`standby`] assembles those frames into a staged
//! epoch that is applied to the replica's memory only when it is complete,
//! checked and next in sequence: a torn, corrupt, replayed or reordered
//! epoch is refused and never applied.
//!
//! Not built yet (the fault-tolerance issue): the primary's epoch loop and
//! its adaptive interval, output commit for network and disk, disk
//! replication, failure detection, failover and re-protection.

pub mod epoch;
pub mod standby;
