//! The A-link: framed, authenticated messages between the two nodes of a pair.
//!
//! Not built yet. The fault-tolerance issue fills this crate with the frame
//! format (type, epoch, length, crc32), the authenticated handshake,
//! heartbeats, flow control and redundant links. Nothing here pretends to
//! work until then: the crate exports no API.
