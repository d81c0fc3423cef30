//! A standby's own faults (issue 9 defect 8): a standby that cannot hold
//! the replica says why to the primary at the plan, and stays ready.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use replicator::protocol::Message;

/// A small tmpfs mounted for the test (needs root, as the whole suite).
struct SmallFs(PathBuf);

impl SmallFs {
    fn mount(name: &str, bytes: u64) -> SmallFs {
        let dir = std::env::temp_dir().join(format!("ft-smallfs-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(&dir)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {bytes}-byte tmpfs at {} failed (the tests need root): {}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        SmallFs(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// The standby's answer to the plan `link` sent: a refusal, whose reason
/// is returned.
async fn refusal(mut link: ft_link::Link) -> String {
    let answer = tokio::time::timeout(WITHIN, link.recv())
        .await
        .expect("the standby answers the plan in time")
        .expect("a frame, not a closed link");
    let Message::Refuse(reason) = Message::from_frame(answer).unwrap().message else {
        panic!("the standby's answer is not a refusal")
    };
    reason
}

/// The standby (still listening) takes a plan that fits and commits an
/// epoch; then it is stopped.
async fn takes_a_plan_then_stops(standby: Standby) {
    let mut link = committed_primary(standby.addr).await;
    send(&link, &[Message::Stop.into_frame(0, 1)]).await;
    let _ = link.recv().await;
    assert!(!standby.task.is_finished(), "the standby still listens");
    standby.task.abort();
    let _ = standby.task.await;
}

/// The replica disk does not fit: the standby refuses at the plan with the
/// sizes, and a session whose disk fits goes on normally afterwards.
/// Before, the standby made a sparse file, took the copy and failed in the
/// middle of it with ENOSPC; the primary saw only a closed link and tried
/// again in a loop, with no reason anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_without_space_for_the_replica_refuses_with_the_reason_and_stays_ready() {
    let fs = SmallFs::mount("nospace", 4 << 20);
    let standby = start_standby_on("nospace", 1, None, Some(fs.path().join("disk.img"))).await;
    // Before, it waited for the copy.
    let reason = refusal(primary_planning(standby.addr, 1, 16 << 20).await).await;
    assert!(
        reason.contains("no space") && reason.contains(&(16u64 << 20).to_string()),
        "the reason names the shortage and the size: {reason}"
    );
    assert!(
        reason.contains("test-standby"),
        "the reason names the node: {reason}"
    );
    // Nothing of the refused replica stays behind to fill the disk.
    let used = std::fs::metadata(fs.path().join("disk.img")).map_or(0, |m| {
        use std::os::unix::fs::MetadataExt;
        m.blocks() * 512
    });
    assert!(used <= 4 << 20, "{used} bytes allocated");
    // A plan that fits is taken.
    takes_a_plan_then_stops(standby).await;
    drop(fs);
}

/// Another process holds the replica disk (a copy of the VM, or a standby
/// of it, that is still stopping): the standby waits a few seconds for
/// it, then refuses the plan with the reason and changes nothing in the
/// file; once the holder is gone, a plan is taken. Before, both processes
/// wrote the same file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_disk_another_process_holds_is_refused_untouched_and_the_standby_stays_ready() {
    let dir = std::env::temp_dir().join(format!("ft-held-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, b"what the other process keeps here").unwrap();
    // flock(1) holds it while its `cat` reads: closing the pipe ends both
    // (nothing is left running).
    let mut holder = Command::new("flock")
        .arg("-x")
        .arg(&disk)
        .arg("cat")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("flock(1) from util-linux");
    // Until the holder has it.
    let until = std::time::Instant::now() + WITHIN;
    while Command::new("flock")
        .args(["-n", "-x"])
        .arg(&disk)
        .arg("true")
        .status()
        .unwrap()
        .success()
    {
        assert!(
            std::time::Instant::now() < until,
            "flock(1) never took the disk"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let standby = start_standby_on("held-disk", 1, None, Some(disk.clone())).await;
    let reason = refusal(primary_planning(standby.addr, 1, DISK_BYTES).await).await;
    assert!(
        reason.contains("in use by another process") && reason.contains("disk.img"),
        "the reason says the disk is held, and which: {reason}"
    );
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        b"what the other process keeps here",
        "the held disk is not truncated or written"
    );
    drop(holder.stdin.take());
    holder.wait().unwrap();
    // The holder gone, a plan is taken.
    takes_a_plan_then_stops(standby).await;
    let _ = std::fs::remove_dir_all(&dir);
}
