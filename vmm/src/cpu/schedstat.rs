//! What the kernel's scheduler tells of a thread: how long it ran on a
//! CPU and how long it was ready to run but waited for one
//! (`/proc/<pid>/task/<tid>/schedstat`, kernels with `CONFIG_SCHED_INFO`,
//! as Debian's). A vCPU thread's waiting is guest time lost to other
//! threads of its node: on a node whose cores its vCPUs share with the
//! FT engine, the engine's work after a checkpoint delays the guest as a
//! stop does.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::time::Duration;

/// A thread's times, since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CpuTimes {
    /// On a CPU (for a vCPU thread, its time in the guest included).
    pub on_cpu: Duration,
    /// Ready to run, waiting for a CPU.
    pub waiting: Duration,
}

impl std::ops::Add for CpuTimes {
    type Output = CpuTimes;

    fn add(self, other: CpuTimes) -> CpuTimes {
        CpuTimes {
            on_cpu: self.on_cpu + other.on_cpu,
            waiting: self.waiting + other.waiting,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SchedstatError {
    #[error("opening this thread's scheduler statistics ({PATH}) failed")]
    Open(#[source] io::Error),
    #[error("reading a thread's scheduler statistics failed")]
    Read(#[source] io::Error),
    #[error("a thread's scheduler statistics are not three numbers: {0:?}")]
    Parse(String),
    #[error("reading the process's CPU time (CLOCK_PROCESS_CPUTIME_ID) failed")]
    ProcessClock(#[source] io::Error),
}

/// The CPU time all threads of this process used so far (vCPU threads'
/// time in the guest included).
pub fn process_cpu_time() -> Result<Duration, SchedstatError> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec to the pointer it is
    // given, which points at `now`, alive and writable for the call.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) } != 0 {
        return Err(SchedstatError::ProcessClock(io::Error::last_os_error()));
    }
    Ok(Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
}

const PATH: &str = "/proc/thread-self/schedstat";

/// One thread's scheduler statistics, readable from any thread.
#[derive(Debug)]
pub struct ThreadClock {
    /// The thread's own file (`/proc/thread-self` is resolved when it is
    /// opened: the file stays the opening thread's).
    file: File,
}

impl ThreadClock {
    /// The calling thread's.
    pub fn current() -> Result<ThreadClock, SchedstatError> {
        File::open(PATH)
            .map(|file| ThreadClock { file })
            .map_err(SchedstatError::Open)
    }

    /// The thread's times now (each read generates the file anew).
    pub fn read(&self) -> Result<CpuTimes, SchedstatError> {
        let mut buf = [0u8; 96];
        let n = self
            .file
            .read_at(&mut buf, 0)
            .map_err(SchedstatError::Read)?;
        parse(&buf[..n])
    }
}

/// `<ns on a CPU> <ns waiting> <timeslices>`.
fn parse(text: &[u8]) -> Result<CpuTimes, SchedstatError> {
    let text = String::from_utf8_lossy(text);
    let bad = || SchedstatError::Parse(text.trim().to_string());
    let mut fields = text.split_ascii_whitespace();
    let mut next = || -> Result<u64, SchedstatError> {
        fields.next().ok_or_else(bad)?.parse().map_err(|_| bad())
    };
    let (on_cpu, waiting) = (next()?, next()?);
    next()?;
    Ok(CpuTimes {
        on_cpu: Duration::from_nanos(on_cpu),
        waiting: Duration::from_nanos(waiting),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn parses_the_three_fields_and_refuses_others() {
        assert_eq!(
            parse(b"1500 2000000 7\n").unwrap(),
            CpuTimes {
                on_cpu: Duration::from_nanos(1500),
                waiting: Duration::from_millis(2),
            }
        );
        for bad in [&b""[..], b"1 2", b"1 x 3", b"-1 2 3"] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn the_process_clock_counts_this_threads_work() {
        let before = process_cpu_time().unwrap();
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        let after = process_cpu_time().unwrap();
        // Spinning 20 ms of wall time: on a CPU for most of it, unless the
        // machine is very busy; at least some.
        assert!(after > before, "{before:?} -> {after:?}");
    }

    /// Read from another thread, the clock is the opening thread's: it
    /// counts the CPU time that thread burns, not the reader's.
    #[test]
    fn another_thread_reads_the_opening_threads_time() {
        let (clock_tx, clock_rx) = std::sync::mpsc::channel();
        let (before_tx, before_rx) = std::sync::mpsc::channel::<CpuTimes>();
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        // The worker lives until the reader is done: a clock whose thread
        // exited reads as an error (ESRCH).
        let (finish_tx, finish_rx) = std::sync::mpsc::channel::<()>();
        let worker = std::thread::spawn(move || {
            let clock = ThreadClock::current().unwrap();
            clock_tx.send(ThreadClock::current().unwrap()).unwrap();
            let before = before_rx.recv().unwrap();
            // Spins until its own reading shows 30 ms more on a CPU (5 s at
            // most: a clock that counted another thread would not move).
            let start = Instant::now();
            let mut x = 0u64;
            let mut seen = clock.read().unwrap();
            while seen.on_cpu < before.on_cpu + Duration::from_millis(30)
                && start.elapsed() < Duration::from_secs(5)
            {
                for _ in 0..10_000 {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                seen = clock.read().unwrap();
            }
            done_tx.send(seen).unwrap();
            let _ = finish_rx.recv();
        });
        let clock = clock_rx.recv().unwrap();
        let before = clock.read().unwrap();
        before_tx.send(before).unwrap();
        let seen_by_worker = done_rx.recv().unwrap();
        // The reader only waited meanwhile; its reading of the worker's
        // clock has the worker's time.
        let after = clock.read().unwrap();
        finish_tx.send(()).unwrap();
        worker.join().unwrap();
        assert!(
            seen_by_worker.on_cpu >= before.on_cpu + Duration::from_millis(30),
            "the worker's clock did not count its spinning: {before:?} -> {seen_by_worker:?}"
        );
        assert!(
            after.on_cpu >= seen_by_worker.on_cpu,
            "{seen_by_worker:?} -> {after:?}"
        );
    }
}
