//! What `ftctl` prints on stdout for a person or a pipeline. A reader that
//! stops reading (`ftctl lab ft-status | head -5`) ends `ftctl` quietly, as
//! the other tools of a pipeline end, instead of with a panic (what Rust's
//! `println!` does when the pipe is closed).

use std::fmt;
use std::io::{self, Write};
use std::process;

/// Prints a line on stdout ([`out`]).
macro_rules! outln {
    ($($arg:tt)*) => {
        $crate::output::out(format_args!("{}\n", format_args!($($arg)*)))
    };
}
pub(crate) use outln;

/// Writes `text` on stdout and flushes it. A closed stdout (the reader went
/// away) ends the process with status 0: nothing failed here, the rest of
/// the output was not wanted. Any other write error ends it with status 1.
pub(crate) fn out(text: fmt::Arguments<'_>) {
    let mut stdout = io::stdout().lock();
    if let Err(error) = stdout.write_fmt(text).and_then(|()| stdout.flush()) {
        exit_on(&error);
    }
}

/// Ends the process after a failed write on stdout (see [`out`]).
pub(crate) fn exit_on(error: &io::Error) -> ! {
    if is_closed(error) {
        process::exit(0);
    }
    eprintln!("ftctl: cannot write the output: {error}");
    process::exit(1);
}

/// Whether a write failed because the reader closed its end.
pub(crate) fn is_closed(error: &io::Error) -> bool {
    error.kind() == io::ErrorKind::BrokenPipe
}
