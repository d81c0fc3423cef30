//! Issue 9 defect 1 without a witness: a FIN or reset on the active path
//! is not a dead primary while the backup path still carries it.

mod common;

use std::time::Duration;

use common::*;
use ft_link::Link;
use replicator::status::FtState;

/// A primary with epoch 1 committed on its active path and a backup path
/// to the standby's second address (both direct: the links heartbeat by
/// themselves).
async fn primary_on_two_paths(standby: &Standby) -> (Link, Link) {
    let link = committed_primary(standby.addr).await;
    (link, backup_path(standby.addr2).await)
}

/// The active path ends with a FIN while the primary lives on the backup:
/// no takeover. Before, the standby promoted at once (the backup's life had
/// to come after the FIN plus a margin, which had not happened yet).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fin_on_the_active_path_of_a_primary_heard_on_the_backup_is_no_takeover() {
    let standby = start_standby("fin-active").await;
    let (link, backup) = primary_on_two_paths(&standby).await;
    drop(link); // FIN on the active path
                // Three silence timeouts (400 ms each) with the backup heartbeating.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert!(
        !standby.task.is_finished(),
        "the standby took over a primary alive on the backup path"
    );
    let status = standby.status.snapshot();
    assert_eq!(status.state, FtState::Waiting, "{status:?}");
    assert!(
        status
            .message
            .as_deref()
            .is_some_and(|m| m.contains("backup path")),
        "{status:?}"
    );
    // The primary's side then closes the backup path too (its process
    // ended, or it starts over): without a witness that is no takeover
    // either (one active copy first); with one, the witness decides.
    drop(backup);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(!standby.task.is_finished(), "no takeover on closed paths");
    standby.task.abort();
}
