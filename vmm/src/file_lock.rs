//! Exclusive `flock`s: what keeps a second process off a file this one
//! writes (guest RAM files, disk images). The callers wait for a holder
//! that is stopping, each in its own way.

use std::fs::File;
use std::os::fd::AsRawFd;

/// Takes an exclusive `flock` on `file` if no other open file description
/// holds one: false if one does.
pub(crate) fn try_lock_exclusive(file: &File) -> std::io::Result<bool> {
    loop {
        // SAFETY: flock on a descriptor the caller owns; no memory is
        // passed to the kernel.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        match error.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => {}
            _ => return Err(error),
        }
    }
}
