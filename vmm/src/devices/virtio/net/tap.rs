//! A TAP interface opened through /dev/net/tun: frames carry a 12-byte
//! virtio_net_hdr_v1 in front, all offloads are off.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::raw::{c_int, c_uint};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;

/// The header in front of every frame: struct virtio_net_hdr_v1.
pub const VNET_HDR_LEN: usize = 12;

const TUNTAP: c_uint = 0x54; // 'T'
ioctl_iow_nr!(TUNSETIFF, TUNTAP, 202, c_int);
ioctl_iow_nr!(TUNSETOFFLOAD, TUNTAP, 208, c_uint);
ioctl_iow_nr!(TUNSETVNETHDRSZ, TUNTAP, 216, c_int);

const IFNAMSIZ: usize = 16;

/// struct ifreq as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: i16,
    _rest: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name {name:?} is empty or longer than {} bytes", IFNAMSIZ - 1)]
    BadName { name: String },
    #[error("cannot open /dev/net/tun for TAP {name}: {source}")]
    OpenTun {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "TAP {name} is attached by another process (a VM, or a standby of one, still running on this node?)"
    )]
    InUse { name: String },
    #[error("cannot attach to TAP {name} (TUNSETIFF): {source}")]
    SetIff {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting the virtio-net header size of TAP {name} failed: {source}")]
    SetVnetHdrSize {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("turning the offloads of TAP {name} off failed: {source}")]
    SetOffload {
        name: String,
        #[source]
        source: std::io::Error,
    },
}

/// An open, non-blocking TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP called `name` (creating it if it does not exist
    /// and the process may), non-blocking, with 12-byte vnet headers.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ {
            return Err(TapError::BadName { name: name.into() });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(|source| TapError::OpenTun {
                name: name.into(),
                source,
            })?;
        let mut ifr = IfReq {
            name: [0; IFNAMSIZ],
            flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16,
            _rest: [0; 22],
        };
        ifr.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq; IfReq has its
        // layout and size (40 bytes) and lives for the call.
        let rc = unsafe { ioctl_with_mut_ref(&file, TUNSETIFF(), &mut ifr) };
        if rc < 0 {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EBUSY) {
                return Err(TapError::InUse { name: name.into() });
            }
            return Err(TapError::SetIff {
                name: name.into(),
                source,
            });
        }
        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        let rc = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ(), &hdr_len) };
        if rc < 0 {
            return Err(TapError::SetVnetHdrSize {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: TUNSETOFFLOAD takes its flags by value; 0 is "no offloads".
        let rc = unsafe { ioctl_with_val(&file, TUNSETOFFLOAD(), 0) };
        if rc < 0 {
            return Err(TapError::SetOffload {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Tap {
            file,
            name: name.into(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included); WouldBlock when none is queued.
    pub fn read_frame(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> std::io::Result<usize> {
        (&self.file).write(frame)
    }
}

/// TAPs this process attached ahead of the NICs that will use them (a
/// standby's, so that its promotion does not wait for the kernel to create
/// them): a NIC restored onto one of these names takes it instead of
/// attaching anew. While here, a TAP is whatever its owner made of it
/// (a standby keeps it down, on its bridge); one left over is closed, and
/// the kernel removes it as it does any TAP no process holds.
#[derive(Debug, Default)]
pub struct AttachedTaps {
    taps: Vec<Tap>,
}

impl AttachedTaps {
    /// Attaches to (creating, where this process may) each TAP of `names`.
    pub fn attach(names: &[String]) -> Result<AttachedTaps, TapError> {
        let taps = names
            .iter()
            .map(|name| Tap::open(name))
            .collect::<Result<_, _>>()?;
        Ok(AttachedTaps { taps })
    }

    /// The names of the TAPs still here.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.taps.iter().map(Tap::name)
    }

    pub fn is_empty(&self) -> bool {
        self.taps.is_empty()
    }

    /// Takes the TAP called `name`, if it is here.
    pub fn take(&mut self, name: &str) -> Option<Tap> {
        let at = self.taps.iter().position(|t| t.name == name)?;
        Some(self.taps.swap_remove(at))
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ifreq_has_the_kernel_layout_and_names_are_checked() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
        assert_eq!(TUNSETIFF(), 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD(), 0x4004_54d0);
        assert_eq!(TUNSETVNETHDRSZ(), 0x4004_54d8);
        assert!(matches!(Tap::open(""), Err(TapError::BadName { .. })));
        assert!(matches!(
            Tap::open("a-name-far-too-long"),
            Err(TapError::BadName { .. })
        ));
    }

    #[test]
    fn attached_taps_are_taken_once_by_name_and_leave_with_their_holder() {
        let names = ["ftattach0".to_string(), "ftattach1".to_string()];
        let mut attached = AttachedTaps::attach(&names).expect("TAPs (needs CAP_NET_ADMIN)");
        let exists = |name: &str| std::path::Path::new("/sys/class/net").join(name).exists();
        assert!(exists("ftattach0") && exists("ftattach1"));
        // Held, a TAP cannot be attached a second time; taken, it is the
        // same attachment (no second open).
        assert!(matches!(
            Tap::open("ftattach1"),
            Err(TapError::InUse { .. })
        ));
        let tap = attached.take("ftattach1").expect("held");
        assert_eq!(tap.name(), "ftattach1");
        assert!(attached.take("ftattach1").is_none());
        assert!(attached.take("not-held").is_none());
        assert_eq!(attached.names().collect::<Vec<_>>(), ["ftattach0"]);
        drop(attached);
        assert!(!exists("ftattach0"), "a TAP no one holds is removed");
        assert!(exists("ftattach1"), "the taken TAP lives with its taker");
        drop(tap);
        assert!(!exists("ftattach1"));
    }
}
