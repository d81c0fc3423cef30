//! Putting a TAP on a bridge and bringing it up, in this process (two
//! ioctls instead of running `ip`, which takes ~200 ms in a lab node), so a
//! promoted VM is reachable right after its restore.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

#[derive(Debug, thiserror::Error)]
pub enum BridgeError {
    #[error("interface name {0:?} is empty, too long or contains NUL")]
    BadName(String),
    #[error("opening a control socket failed: {0}")]
    Socket(#[source] std::io::Error),
    #[error("there is no interface named {0}")]
    NoSuchInterface(String),
    #[error("{what} ({name}) failed: {source}")]
    Ioctl {
        what: &'static str,
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// SIOCBRADDIF from linux/sockios.h (libc has it for Android only).
const SIOCBRADDIF: libc::c_ulong = 0x89a2;

fn request_for(name: &str) -> Result<libc::ifreq, BridgeError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(BridgeError::BadName(name.to_string()));
    }
    // SAFETY: ifreq is plain C data for which all-zero bytes are valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = src as libc::c_char;
    }
    Ok(req)
}

fn ioctl(
    sock: &OwnedFd,
    request: libc::c_ulong,
    req: &mut libc::ifreq,
    what: &'static str,
    name: &str,
) -> Result<(), BridgeError> {
    // SAFETY: the socket is open and `req` is a valid ifreq that outlives
    // the call; these requests read and write only that struct.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), request as _, req as *mut libc::ifreq) };
    if rc < 0 {
        return Err(BridgeError::Ioctl {
            what,
            name: name.to_string(),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Adds `tap` to `bridge` (already a member is fine) and sets it up.
pub fn join(tap: &str, bridge: &str) -> Result<(), BridgeError> {
    // Both names are checked before anything is touched.
    request_for(tap)?;
    request_for(bridge)?;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(BridgeError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let cname = CString::new(tap).map_err(|_| BridgeError::BadName(tap.to_string()))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(BridgeError::NoSuchInterface(tap.to_string()));
    }
    let mut req = request_for(bridge)?;
    req.ifr_ifru.ifru_ifindex = index as libc::c_int;
    match ioctl(
        &sock,
        SIOCBRADDIF,
        &mut req,
        "adding the TAP to the bridge",
        bridge,
    ) {
        Err(BridgeError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {}
        other => other?,
    }
    let mut req = request_for(tap)?;
    ioctl(
        &sock,
        libc::SIOCGIFFLAGS as _,
        &mut req,
        "reading the TAP's flags",
        tap,
    )?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | libc::IFF_UP as libc::c_short;
    ioctl(
        &sock,
        libc::SIOCSIFFLAGS as _,
        &mut req,
        "bringing the TAP up",
        tap,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_names_and_missing_interfaces_are_reported() {
        assert!(matches!(join("", "br0"), Err(BridgeError::BadName(_))));
        assert!(matches!(
            join("no-such-tap-x", "br0"),
            Err(BridgeError::NoSuchInterface(_))
        ));
    }
}
