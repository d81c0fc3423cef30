//! Reading the connection with the kernel's arrival time of the bytes read
//! (`SO_TIMESTAMPNS`).
//!
//! A node busy applying an epoch reads, after its peer died, bytes that
//! arrived before the death. Counted as heard when read, they put off the
//! silence that ends the session by this node's backlog, and they make the
//! peer's last arrival (from which a promoted standby keeps the frames it
//! overheard) later than it was. Counted as heard when they arrived, they
//! do neither.
//!
//! Only a link with pulses counts bytes so: a receiver that fell behind by
//! a whole receive window held its peer back, and without pulses nothing
//! else tells that the peer lived meanwhile.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::BytesMut;
use tokio::io::Interest;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// A read makes room for at least this much when less is free.
const READ_ROOM: usize = 64 * 1024;

/// The wall clock may move against the monotonic clock by this much
/// between two reads (slewing, the reads' own spacing) before a stamp is
/// no longer trusted: a step of the wall clock would move every stamp
/// taken before it.
const CLOCK_STEP: Duration = Duration::from_millis(5);

/// Asks the kernel to stamp the bytes that arrive on `stream`.
pub(super) fn stamp_arrivals(stream: &TcpStream) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket, reading a c_int of the size
    // given; it keeps no pointer past the call.
    let rc = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What one read took from the connection.
#[derive(Debug, Clone, Copy)]
pub(super) struct Read {
    /// Bytes read (0: the peer closed its end).
    pub len: usize,
    /// When the last of them arrived, on the wall clock (None: the kernel
    /// gave no stamp).
    pub stamp: Option<SystemTime>,
}

/// Reads what arrives next into `buf`'s free room. Cancel-safe: nothing is
/// taken from the connection unless the read returns.
pub(super) async fn read_stamped(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<Read> {
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || recv_stamped(stream.as_raw_fd(), buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// Reads what has arrived already, without waiting (None: nothing has).
/// Asks the socket itself, not the runtime's idea of its readiness (which
/// may be out of date when the runtime put a read off).
pub(super) fn try_read_stamped(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<Option<Read>> {
    match recv_stamped(stream.as_raw_fd(), buf) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
        result => result.map(Some),
    }
}

/// One `recvmsg` into `buf`'s free room, with its arrival stamp.
fn recv_stamped(fd: RawFd, buf: &mut BytesMut) -> io::Result<Read> {
    if buf.capacity() - buf.len() < READ_ROOM / 16 {
        buf.reserve(READ_ROOM);
    }
    let room = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: room.as_mut_ptr().cast(),
        iov_len: room.len(),
    };
    // Room for one SCM_TIMESTAMPNS message and then some; u64 for the
    // alignment of cmsghdr.
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain C data for which all-zero bytes are valid.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at one iovec over `buf`'s free room and at
    // `control`, both alive and writable for the call, with their lengths;
    // recvmsg writes only within them.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let len = n as usize;
    // SAFETY: recvmsg wrote `len` bytes (at most the room's length) at the
    // start of the free room, so they are initialised.
    unsafe { buf.set_len(buf.len() + len) };
    Ok(Read {
        len,
        stamp: stamp_in(&msg),
    })
}

/// The SCM_TIMESTAMPNS stamp in a message `recvmsg` filled.
fn stamp_in(msg: &libc::msghdr) -> Option<SystemTime> {
    let wanted = std::mem::size_of::<libc::timespec>();
    // SAFETY: `msg` was filled by recvmsg: its control pointer and length
    // describe the control messages it wrote, which CMSG_FIRSTHDR and
    // CMSG_NXTHDR walk without leaving (they return null at the end).
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(msg) };
    while !cmsg.is_null() {
        // SAFETY: a non-null header from CMSG_FIRSTHDR/NXTHDR lies within
        // the control buffer.
        let header = unsafe { &*cmsg };
        // SAFETY: CMSG_LEN only computes a length.
        let needed = unsafe { libc::CMSG_LEN(wanted as u32) } as usize;
        if header.cmsg_level == libc::SOL_SOCKET
            && header.cmsg_type == libc::SCM_TIMESTAMPNS
            && header.cmsg_len as usize >= needed
        {
            // SAFETY: the header's length covers a timespec after it;
            // the read does not assume alignment.
            let ts: libc::timespec =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg).cast()) };
            let since_epoch = Duration::new(
                u64::try_from(ts.tv_sec).ok()?,
                u32::try_from(ts.tv_nsec).ok()?,
            );
            return Some(UNIX_EPOCH + since_epoch);
        }
        // SAFETY: as above; `cmsg` is a header within `msg`'s buffer.
        cmsg = unsafe { libc::CMSG_NXTHDR(msg, cmsg) };
    }
    None
}

/// Turns wall-clock stamps into instants of the monotonic clock, and
/// notices a step of the wall clock (after one, a stamp is not trusted).
#[derive(Debug)]
pub(super) struct ArrivalClock {
    /// Where the monotonic readings below count from.
    base: Instant,
    /// Wall clock minus monotonic clock at the last read (ns).
    last_offset: Option<i128>,
}

impl ArrivalClock {
    pub fn new() -> ArrivalClock {
        let wall = SystemTime::now();
        let base = Instant::now();
        let mut clock = ArrivalClock {
            base,
            last_offset: None,
        };
        clock.last_offset = clock.offset(wall, base);
        clock
    }

    /// Wall clock minus monotonic clock (ns; None before 1970).
    fn offset(&self, wall: SystemTime, now: Instant) -> Option<i128> {
        let wall = wall.duration_since(UNIX_EPOCH).ok()?;
        let monotonic = now.saturating_duration_since(self.base);
        Some(wall.as_nanos() as i128 - monotonic.as_nanos() as i128)
    }

    /// When bytes stamped `stamp` arrived, at the latest now (now as well
    /// when there is no stamp, or the wall clock moved since the last read).
    pub fn arrival(&mut self, stamp: Option<SystemTime>) -> Instant {
        // The wall clock first: time lost between the two readings makes
        // the arrival later, never earlier.
        let wall = SystemTime::now();
        let now = Instant::now();
        let Some(offset) = self.offset(wall, now) else {
            return now;
        };
        let stepped = self
            .last_offset
            .is_none_or(|last| (offset - last).unsigned_abs() > CLOCK_STEP.as_nanos());
        self.last_offset = Some(offset);
        match stamp {
            Some(stamp) if !stepped => match wall.duration_since(stamp) {
                Ok(ago) => now.checked_sub(ago).unwrap_or(now),
                // Stamped after this read: a step of the clock.
                Err(_) => now,
            },
            _ => now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stamp_becomes_the_instant_it_names_and_never_a_later_one() {
        let mut clock = ArrivalClock::new();
        let before = Instant::now();
        let at = clock.arrival(Some(SystemTime::now() - Duration::from_millis(80)));
        let ago = before.saturating_duration_since(at);
        assert!(
            ago > Duration::from_millis(70) && ago < Duration::from_millis(90),
            "{ago:?}"
        );
        // No stamp, or one from the future (the wall clock stepped back):
        // now, which never makes a live peer look silent.
        let before = Instant::now();
        assert!(clock.arrival(None) >= before);
        let future = SystemTime::now() + Duration::from_secs(3);
        assert!(clock.arrival(Some(future)) >= before);
    }

    #[tokio::test]
    async fn reads_over_tcp_carry_the_kernels_stamp() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accepted, connected) = tokio::join!(listener.accept(), TcpStream::connect(addr));
        let (receiving, mut sending) = (accepted.unwrap().0, connected.unwrap());
        stamp_arrivals(&receiving).unwrap();
        let mut buf = BytesMut::new();
        assert!(try_read_stamped(&receiving, &mut buf).unwrap().is_none());
        // The kernel may switch its stamps on a moment later (a work
        // queue): bytes until one comes stamped.
        for _ in 0..100 {
            tokio::io::AsyncWriteExt::write_all(&mut sending, b".")
                .await
                .unwrap();
            let read = read_stamped(&receiving, &mut buf).await.unwrap();
            if read.stamp.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        buf.clear();
        tokio::io::AsyncWriteExt::write_all(&mut sending, b"epoch")
            .await
            .unwrap();
        let sent = SystemTime::now();
        std::thread::sleep(Duration::from_millis(60));
        let read = read_stamped(&receiving, &mut buf).await.unwrap();
        assert_eq!((read.len, &buf[..]), (5, &b"epoch"[..]));
        let stamp = read.stamp.expect("the kernel stamped the bytes");
        let off = sent.duration_since(stamp).unwrap_or_else(|e| e.duration());
        assert!(
            off < Duration::from_millis(30),
            "stamped {off:?} away from the send"
        );
    }
}
