//! The quorum witness of an FT pair: a third party that decides, per VM,
//! which node runs the active copy.
//!
//! It keeps, per VM, the current **generation** (incremented at every change
//! of the active copy, and when a primary that lost its standby runs on
//! alone) and the node that owns it, in SQLite, written to stable storage
//! before any answer that depends on it. Three rules follow:
//! - a standby whose primary fell silent asks for the next generation
//!   ([`Request::Claim`]); it is granted only once the witness has not heard
//!   the owner for the silence timeout, and refused for good when the owner
//!   moved on (a newer generation): the replica it holds is stale then;
//! - a primary that lost its standby asks to go on alone
//!   ([`Request::Confirm`]); it is confirmed (with a new generation, so the
//!   lost standby's replica can never be promoted) unless a claim won first;
//! - a primary renews a short lease ([`Request::Hold`]) all the time; it
//!   releases output without a standby only under a lease it holds, and the
//!   lease is shorter than the silence a claim waits for, so a granted claim
//!   always finds the old primary's output stopped.
//!
//! - [`protocol`]: the requests and answers (JSON in A-link message frames).
//! - [`store`]: the records on disk.
//! - [`registry`]: the rules, over the records and what the witness hears.
//! - [`server`]: the service (`ftwitness serve`): connections over ft-link,
//!   authenticated with the pair secret.
//! - [`client`]: what the nodes use to ask.

pub mod client;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod store;

pub use client::{WitnessClient, WitnessError};
pub use protocol::{Answer, Record, Request};
