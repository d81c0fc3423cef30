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
    let sock = control_socket()?;
    add_to(&sock, tap, bridge)?;
    bring_up(&sock, tap)
}

/// Takes `tap` down and adds it to `bridge` (already a member is fine): a
/// TAP that is down takes no part in the bridge until [`join`] brings it
/// up (nothing is forwarded to it, nothing queues in it).
pub fn add(tap: &str, bridge: &str) -> Result<(), BridgeError> {
    request_for(tap)?;
    request_for(bridge)?;
    index_of(tap)?;
    let sock = control_socket()?;
    set_up(&sock, tap, false)?;
    add_to(&sock, tap, bridge)
}

/// Turns IPv6 off on `tap` (a bridge port has no address of its own). A
/// kernel without IPv6 has nothing to turn off; a failure is logged.
pub fn without_ipv6(tap: &str) {
    if request_for(tap).is_err() {
        return;
    }
    let path = format!("/proc/sys/net/ipv6/conf/{tap}/disable_ipv6");
    match std::fs::write(&path, "1") {
        Ok(()) => {}
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
        Err(error) => tracing::warn!(tap, %error, "could not turn IPv6 off on the TAP"),
    }
}

fn control_socket() -> Result<OwnedFd, BridgeError> {
    // SAFETY: plain socket(2) call; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(BridgeError::Socket(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly opened descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn index_of(tap: &str) -> Result<libc::c_uint, BridgeError> {
    let cname = CString::new(tap).map_err(|_| BridgeError::BadName(tap.to_string()))?;
    // SAFETY: `cname` is a valid NUL-terminated string for the call.
    match unsafe { libc::if_nametoindex(cname.as_ptr()) } {
        0 => Err(BridgeError::NoSuchInterface(tap.to_string())),
        index => Ok(index),
    }
}

/// A TAP's own MAC never reaches the guest's peers (the guest's NIC has
/// its own), but a bridge whose address was not set takes the lowest of
/// its ports' MACs, down ports included: a TAP's random one could change
/// the bridge's MAC, and so the node's own address's, as it joins or
/// leaves. With its first byte 0xfe (locally administered, as libvirt
/// does) it is never the lowest.
fn keep_off_bridge_address(sock: &OwnedFd, tap: &str) -> Result<(), BridgeError> {
    let mut req = request_for(tap)?;
    ioctl(
        sock,
        libc::SIOCGIFHWADDR as _,
        &mut req,
        "reading the TAP's MAC",
        tap,
    )?;
    // SAFETY: SIOCGIFHWADDR filled in the hwaddr member of the union.
    let first = unsafe { &mut req.ifr_ifru.ifru_hwaddr.sa_data[0] };
    if *first as u8 == 0xfe {
        return Ok(());
    }
    *first = 0xfe_u8 as libc::c_char;
    ioctl(
        sock,
        libc::SIOCSIFHWADDR as _,
        &mut req,
        "setting the TAP's MAC",
        tap,
    )
}

fn add_to(sock: &OwnedFd, tap: &str, bridge: &str) -> Result<(), BridgeError> {
    if let Err(error) = keep_off_bridge_address(sock, tap) {
        tracing::warn!(tap, bridge, %error, "the TAP keeps its MAC: the bridge's own MAC may change as it joins");
    }
    let index = index_of(tap)?;
    let mut req = request_for(bridge)?;
    req.ifr_ifru.ifru_ifindex = index as libc::c_int;
    match ioctl(
        sock,
        SIOCBRADDIF,
        &mut req,
        "adding the TAP to the bridge",
        bridge,
    ) {
        Err(BridgeError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EBUSY) => {
            Ok(())
        }
        other => other,
    }
}

fn bring_up(sock: &OwnedFd, tap: &str) -> Result<(), BridgeError> {
    set_up(sock, tap, true)
}

fn set_up(sock: &OwnedFd, tap: &str, up: bool) -> Result<(), BridgeError> {
    let mut req = request_for(tap)?;
    ioctl(
        sock,
        libc::SIOCGIFFLAGS as _,
        &mut req,
        "reading the TAP's flags",
        tap,
    )?;
    // SAFETY: SIOCGIFFLAGS filled in the flags member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    let wanted = if up {
        flags | libc::IFF_UP as libc::c_short
    } else {
        flags & !(libc::IFF_UP as libc::c_short)
    };
    if wanted == flags {
        return Ok(());
    }
    req.ifr_ifru.ifru_flags = wanted;
    ioctl(
        sock,
        libc::SIOCSIFFLAGS as _,
        &mut req,
        if up {
            "bringing the TAP up"
        } else {
            "taking the TAP down"
        },
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
        assert!(matches!(
            add("no-such-tap-x", "br0"),
            Err(BridgeError::NoSuchInterface(_))
        ));
    }

    /// A bridge of its own, removed when the test ends.
    struct TestBridge(&'static str);

    impl TestBridge {
        fn new(name: &'static str) -> TestBridge {
            let _ = ip(&["link", "del", name]);
            assert!(
                ip(&["link", "add", name, "type", "bridge"]),
                "bridge (needs CAP_NET_ADMIN)"
            );
            assert!(ip(&["link", "set", name, "up"]));
            TestBridge(name)
        }
    }

    impl Drop for TestBridge {
        fn drop(&mut self) {
            let _ = ip(&["link", "del", self.0]);
        }
    }

    fn ip(args: &[&str]) -> bool {
        std::process::Command::new("ip")
            .args(args)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    fn sys(tap: &str, what: &str) -> String {
        std::fs::read_to_string(format!("/sys/class/net/{tap}/{what}"))
            .unwrap_or_default()
            .trim()
            .to_string()
    }

    #[test]
    fn a_tap_added_ahead_stays_down_and_out_of_forwarding_until_it_joins() {
        let bridge = TestBridge::new("ftbrtest0");
        let _attached =
            vmm::replication::AttachedTaps::attach(&["ftbrtap0".to_string()]).expect("TAP");
        without_ipv6("ftbrtap0");
        // Up before (as a network manager might have left it): taken down.
        assert!(ip(&["link", "set", "ftbrtap0", "up"]));
        add("ftbrtap0", bridge.0).expect("added");
        // Its MAC is kept above the bridge's.
        assert!(
            sys("ftbrtap0", "address").starts_with("fe:"),
            "{}",
            sys("ftbrtap0", "address")
        );
        let master = std::fs::read_link("/sys/class/net/ftbrtap0/master").expect("on a bridge");
        assert!(master.ends_with(bridge.0), "{master:?}");
        // Down: the bridge forwards nothing to it (state 0, disabled).
        let flags = u32::from_str_radix(sys("ftbrtap0", "flags").trim_start_matches("0x"), 16);
        assert_eq!(flags.expect("flags") & libc::IFF_UP as u32, 0);
        assert_eq!(sys("ftbrtap0", "brport/state"), "0");
        // Added again (a member already): fine, and still down.
        add("ftbrtap0", bridge.0).expect("added twice");
        assert_eq!(sys("ftbrtap0", "brport/state"), "0");
        // Joined: up and forwarding (3) at once, with no STP on the bridge.
        join("ftbrtap0", bridge.0).expect("joined");
        assert_eq!(sys("ftbrtap0", "brport/state"), "3");
        // Up without an IPv6 address of its own.
        let inet6 = std::fs::read_to_string("/proc/net/if_inet6").unwrap_or_default();
        assert!(!inet6.lines().any(|l| l.ends_with(" ftbrtap0")), "{inet6}");
    }
}
