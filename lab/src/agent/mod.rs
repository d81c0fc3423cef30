//! The lab agent: a small server of ours in every lab node that runs commands
//! and answers data transfers, so the outer host (and the other node) can
//! drive a node without typing into its serial console.
//!
//! Wire format: one JSON request line, then (for `echo`) its raw payload; one
//! JSON response line back, then (for `echo`) the payload returned.

pub mod client;
pub mod pattern;
pub mod protocol;
pub mod server;

pub use client::{AgentClient, AgentError, EchoReport, ExecOutput};
pub use protocol::{Request, Response};

/// The port the agent listens on inside a node.
pub const AGENT_PORT: u16 = 7100;
