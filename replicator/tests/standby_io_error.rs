//! Issue 11: an I/O error on the standby's disk is surfaced. At level HA a
//! batch of guest writes that the mirror cannot write (or make durable) is
//! not acknowledged: the standby tells the primary why (`Refuse`, with the
//! error) and ends the session without a takeover; the primary then runs
//! unprotected and says so. The failing write is EFBIG from a file-size
//! limit (RLIMIT_FSIZE) set on this test's process after the session began:
//! a real write error from the kernel on the replica's file. Alone in its
//! test binary: the limit is process-wide.

mod common;

use common::*;
use replicator::protocol::Message;

/// Sets this process's file-size limit (and ignores SIGXFSZ, so that a
/// write past it fails with EFBIG instead of ending the process).
fn limit_file_size(bytes: u64) {
    let limit = libc::rlimit {
        rlim_cur: bytes,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct above; signal installs the
    // SIG_IGN disposition for SIGXFSZ (no handler code runs).
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &limit), 0);
    }
}

#[tokio::test]
async fn a_mirror_that_cannot_write_a_batch_refuses_it_with_the_error_and_does_not_take_over() {
    let standby = start_standby("mirror-io-error").await;
    let mut link = mirrored_primary(&standby).await;
    send(&link, &mirror_epoch(1, 4096, b"fits")).await;
    expect_ack(&mut link, 1).await;
    // From now on no write may reach past 256 KiB of a file.
    limit_file_size(256 << 10);
    send(&link, &mirror_epoch(2, 600 << 10, b"past the limit")).await;
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("an answer in time")
        .expect("the refusal before the close");
    limit_file_size(libc::RLIM_INFINITY);
    let envelope = Message::from_frame(answer).expect("a replication message");
    let Message::Refuse(reason) = envelope.message else {
        panic!("{} instead of a refusal", envelope.message.name());
    };
    assert!(
        reason.contains("disk.img") && reason.contains("too large"),
        "the reason names the disk and the error: {reason}"
    );
    until(&standby, "the epoch counted as refused", |s| {
        s.counters.epochs_rejected == 1
    })
    .await;
    assert!(
        !standby.task.is_finished(),
        "an I/O error became a takeover"
    );
    // The standby serves the next session.
    let mut link = mirrored_primary(&standby).await;
    send(&link, &mirror_epoch(1, 4096, b"again")).await;
    expect_ack(&mut link, 1).await;
}
