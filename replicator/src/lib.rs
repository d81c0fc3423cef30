//! The FT engine: epoch scheduler, checkpoint capture and staging, the send
//! pipeline, standby apply, output commit, failure detection and failover.
//!
//! Not built yet: the fault-tolerance issue fills this crate on top of `vmm`
//! and `ft-link`. It exports no API until then, so nothing can mistake it for
//! a working engine.
