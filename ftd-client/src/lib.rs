//! The client of `ftd`'s REST API: where the API is, its bearer token, one
//! method per endpoint, the live event stream; and the API's JSON types as
//! a client reads them (unknown fields ignored). It speaks only HTTP: it
//! does not depend on the `ftd` crate.

pub mod client;
pub mod model;

pub use client::{ApiClient, ClientError};
