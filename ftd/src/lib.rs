//! `ftd`, the node manager of an FT pair: one daemon per node that keeps
//! the VM definitions in its database, supervises each VM's role on this
//! node (the replicator's `ftprotect` processes), and serves the REST API
//! with its OpenAPI document, Prometheus metrics and live events.
//!
//! Layering: `ftd` -> `replicator` (its status types and control socket);
//! nothing below knows the store or the API.

pub mod api;
pub mod config;
pub mod console;
#[cfg(test)]
mod fixtures;
pub mod maintenance;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod pair;
pub mod quorum;
pub mod secrets;
pub mod store;
pub mod supervisor;
pub mod switchover;
pub mod users;
