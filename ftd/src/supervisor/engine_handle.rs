//! A handle on an engine process this `ftd` did not start: one a previous
//! `ftd` left running and this one adopted. Its pid comes from the control
//! socket (the kernel names the process that answered); the handle is a
//! pidfd (Linux 5.3 and later), which names that one process even once its
//! pid is free again, tells when it has ended and signals it. Without it,
//! an adopted engine that stopped answering would count as gone while it
//! still ran, and a stop would return before it had.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

/// How often [`EngineHandle::wait_ended`] looks.
const LOOK_EVERY: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum EngineHandleError {
    #[error("cannot open a handle (pidfd) on process {pid}: {source}")]
    Open { pid: u32, source: io::Error },
    #[error("cannot tell whether process {pid} has ended: {source}")]
    Look { pid: u32, source: io::Error },
    #[error("cannot kill process {pid}: {source}")]
    Kill { pid: u32, source: io::Error },
}

impl EngineHandleError {
    /// The process had ended already (no handle on it could be made).
    pub fn process_gone(&self) -> bool {
        matches!(self, EngineHandleError::Open { source, .. } if source.raw_os_error() == Some(libc::ESRCH))
    }
}

/// One running process, by a pidfd.
#[derive(Debug)]
pub struct EngineHandle {
    pidfd: OwnedFd,
    pid: u32,
}

impl EngineHandle {
    /// A handle on process `pid`. The caller checks afterwards that the
    /// process is still the one it meant (a pid is free for reuse once its
    /// process has ended).
    pub fn open(pid: u32) -> Result<EngineHandle, EngineHandleError> {
        let open_err = |source| EngineHandleError::Open { pid, source };
        let raw_pid = libc::pid_t::try_from(pid)
            .map_err(|_| open_err(io::Error::from(io::ErrorKind::InvalidInput)))?;
        // SAFETY: pidfd_open takes a pid and flags (none) by value and
        // returns a new descriptor or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, raw_pid, 0) };
        if fd < 0 {
            return Err(open_err(io::Error::last_os_error()));
        }
        let fd = i32::try_from(fd).map_err(|_| open_err(io::Error::other("descriptor")))?;
        // SAFETY: `fd` is a descriptor the call above just made for this
        // process; nothing else owns or closes it.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(EngineHandle { pidfd, pid })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// Whether the process has ended (no wait).
    pub fn ended(&self) -> Result<bool, EngineHandleError> {
        let mut look = libc::pollfd {
            fd: self.pidfd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        loop {
            // SAFETY: one valid `pollfd`, ours for the call; timeout 0.
            let n = unsafe { libc::poll(&mut look, 1, 0) };
            if n >= 0 {
                return Ok(n > 0 && look.revents & (libc::POLLIN | libc::POLLHUP) != 0);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(EngineHandleError::Look {
                    pid: self.pid,
                    source: e,
                });
            }
        }
    }

    /// Waits up to `within` for the process to end; whether it has.
    pub async fn wait_ended(&self, within: Duration) -> Result<bool, EngineHandleError> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.ended()? {
                return Ok(true);
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(false);
            }
            tokio::time::sleep(LOOK_EVERY).await;
        }
    }

    /// Sends SIGKILL (a process already ended is not an error).
    pub fn kill(&self) -> Result<(), EngineHandleError> {
        // SAFETY: pidfd_send_signal takes our pidfd, a signal number, a
        // null siginfo (the kernel fills in one of its own) and flags
        // (none); no memory of ours is read or written.
        let r = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(EngineHandleError::Kill {
                    pid: self.pid,
                    source: e,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    fn sleeper() -> Child {
        Command::new("sleep").arg("60").spawn().expect("sleep")
    }

    #[tokio::test]
    async fn a_running_process_has_not_ended_and_a_killed_one_has() {
        let mut child = sleeper();
        let handle = EngineHandle::open(child.id()).unwrap();
        assert_eq!(handle.pid(), child.id());
        assert!(!handle.ended().unwrap());
        assert!(!handle.wait_ended(Duration::from_millis(120)).await.unwrap());
        handle.kill().unwrap();
        assert!(handle.wait_ended(Duration::from_secs(10)).await.unwrap());
        // The kill was a real SIGKILL.
        let status = child.wait().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        // Killing a process that has ended (and was reaped) is no error.
        handle.kill().unwrap();
        assert!(handle.ended().unwrap());
    }

    #[tokio::test]
    async fn a_stopped_process_has_not_ended_and_is_killed_all_the_same() {
        let mut child = sleeper();
        let handle = EngineHandle::open(child.id()).unwrap();
        // SIGSTOP: it no longer runs, nor answers anything, but lives.
        // SAFETY: kill with the pid of our own child, which has not been
        // waited for (the pid is still its).
        assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGSTOP) }, 0);
        assert!(!handle.wait_ended(Duration::from_millis(300)).await.unwrap());
        handle.kill().unwrap();
        assert!(handle.wait_ended(Duration::from_secs(10)).await.unwrap());
        child.wait().unwrap();
    }

    #[test]
    fn no_such_process_is_an_error_that_names_it() {
        // Pids above the kernel's pid_max (at most 2^22) are never used.
        let e = EngineHandle::open((1 << 22) + 7).unwrap_err();
        assert!(
            e.to_string().contains(&((1u32 << 22) + 7).to_string()),
            "{e}"
        );
    }
}
