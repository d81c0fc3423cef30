//! What `ftctl` prints on stdout for a person or a pipeline. A reader that
//! stops reading (`ftctl lab ft-status | head -5`) does not end the
//! command: the rest of its output is dropped, and it runs to its end and
//! its exit status as it would with its output discarded (Rust's
//! `println!` panics there). Another failure to write (a full disk) is told
//! on stderr, and fails the command.

use std::fmt;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU8, Ordering};

/// Prints a line on stdout ([`out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// Stdout takes what is written.
const OPEN: u8 = 0;
/// Its reader went away: nothing more is written.
const CLOSED: u8 = 1;
/// A write failed otherwise: nothing more is written, and ftctl fails.
const FAILED: u8 = 2;

static STDOUT: AtomicU8 = AtomicU8::new(OPEN);

/// Writes `text` on stdout and flushes it, unless an earlier write failed.
pub(crate) fn out(text: fmt::Arguments<'_>) {
    if STDOUT.load(Ordering::Relaxed) != OPEN {
        return;
    }
    if let Err(error) = write(text) {
        write_failed(&error);
    }
}

/// Writes `text` on stdout and flushes it (at once: `events --follow`
/// prints as events come); the caller decides what a failure means.
pub(crate) fn write(text: fmt::Arguments<'_>) -> io::Result<()> {
    let mut stdout = io::stdout().lock();
    stdout.write_fmt(text).and_then(|()| stdout.flush())
}

/// After a failed write on stdout: nothing more is written; a failure
/// other than a reader that went away is told on stderr (once).
fn write_failed(error: &io::Error) {
    if reader_gone(error) {
        STDOUT.store(CLOSED, Ordering::Relaxed);
    } else if STDOUT.swap(FAILED, Ordering::Relaxed) != FAILED {
        eprintln!("ftctl: cannot write the output: {error}");
    }
}

/// Whether a write failed because the reader closed its end.
pub(crate) fn reader_gone(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}

/// Whether writing the output failed (for another reason than a reader
/// that went away).
pub(crate) fn failed() -> bool {
    STDOUT.load(Ordering::Relaxed) == FAILED
}
