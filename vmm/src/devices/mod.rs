//! Emulated devices. Each device is a folder: its logic, and its saved state
//! (plain serde data with a version) kept apart.

pub mod bus;
pub mod i8042;
pub mod serial;
pub mod virtio;
