//! Watching both nodes during a fault for two active copies: each node's
//! FT engine is asked for its status through the node's agent (over the
//! management NIC, which no drill cuts), one node after the other, all the
//! time. A copy counts as active at a sample when its engine is the
//! primary, not fenced or superseded, and its released-output counter
//! went up since its previous sample (output reached the network). Two
//! active copies are seen when both are active at samples less than a
//! second apart. A fenced copy that releases output counts as active.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use replicator::status::{FtState, Role, Status};

use crate::ft_pair::VM_NAME;
use crate::lab::Lab;
use crate::topology::NodeId;

/// What the watch saw.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub samples: u64,
    /// Times both copies were active together.
    pub two_active: u64,
    /// The first such moment, described.
    pub first_two_active: Option<String>,
    /// States each node went through (in order, repeats folded).
    pub states: [Vec<String>; 2],
}

struct Last {
    at: Instant,
    active: bool,
    released: u64,
    status: Status,
}

/// Judges samples as they come, one node's at a time.
#[derive(Default)]
pub struct Judge {
    last: [Option<Last>; 2],
    pub seen: Seen,
}

impl Judge {
    /// `node` could not be asked: its previous sample no longer counts.
    pub fn unanswered(&mut self, node: NodeId) {
        self.last[node.index() as usize] = None;
    }

    /// `node`'s engine reported `status` at `now`.
    pub fn observe(&mut self, node: NodeId, status: Status, now: Instant) {
        let i = node.index() as usize;
        let before = self.last[i].as_ref().map(|l| l.released);
        let is_active = active(&status, before);
        let seen = &mut self.seen;
        seen.samples += 1;
        let state = format!("{} {}", status.role, status.state);
        if seen.states[i].last() != Some(&state) {
            seen.states[i].push(state);
        }
        if let Some(o) = self.last[1 - i]
            .as_ref()
            .filter(|o| is_active && o.active && now.duration_since(o.at) < Duration::from_secs(1))
        {
            seen.two_active += 1;
            if seen.first_two_active.is_none() {
                seen.first_two_active = Some(format!(
                    "node {node}: {} {} generation {}; node {}: {} {} generation {}",
                    status.role,
                    status.state,
                    status.generation,
                    node.peer(),
                    o.status.role,
                    o.status.state,
                    o.status.generation
                ));
            }
        }
        self.last[i] = Some(Last {
            at: now,
            active: is_active,
            released: status.counters.output_frames_released,
            status,
        });
    }
}

pub struct Watch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Seen>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a sample may take (a busy TCG node answers slowly).
const SAMPLE_WITHIN: Duration = Duration::from_secs(3);

/// The status of the ledger VM's engine on `node`, through its agent.
pub fn engine_status(lab: &Lab, node: NodeId) -> Option<Status> {
    let sock = format!("/run/ftd/{VM_NAME}.sock");
    let out = lab
        .exec(
            node,
            &["/bin/ftprotect", "ctl", "--sock", &sock, "status"],
            SAMPLE_WITHIN,
        )
        .ok()?;
    serde_json::from_str(&out.stdout).ok()
}

/// Asks the ledger VM's primary engine on `node` to digest its next
/// checkpoint for the standby to compare (the consistency oracle).
pub fn ask_verify(lab: &Lab, node: NodeId) -> Result<(), String> {
    let sock = format!("/run/ftd/{VM_NAME}.sock");
    let out = lab
        .exec(
            node,
            &["/bin/ftprotect", "ctl", "--sock", &sock, "verify"],
            SAMPLE_WITHIN,
        )
        .map_err(|e| e.to_string())?;
    if out.success() {
        Ok(())
    } else {
        Err(format!("{} {}", out.stdout.trim(), out.stderr.trim()))
    }
}

fn active(status: &Status, released_before: Option<u64>) -> bool {
    let running = matches!(
        status.state,
        FtState::Protected | FtState::Unprotected | FtState::Syncing | FtState::Fenced
    );
    let released = status.counters.output_frames_released;
    status.role == Role::Primary && running && released_before.is_some_and(|b| released > b)
}

impl Watch {
    pub fn start(lab: &Lab) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Seen::default()));
        let lab = Lab::open(&lab.topo.name).expect("the lab opened before");
        let (stopping, record) = (Arc::clone(&stop), Arc::clone(&seen));
        let thread = std::thread::spawn(move || {
            let mut judge = Judge::default();
            while !stopping.load(Ordering::Relaxed) {
                for node in NodeId::ALL {
                    match engine_status(&lab, node) {
                        Some(status) => judge.observe(node, status, Instant::now()),
                        None => judge.unanswered(node),
                    }
                }
                record.lock().expect("watch").clone_from(&judge.seen);
            }
        });
        Watch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// Stops watching; what was seen.
    pub fn finish(mut self) -> Seen {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.seen.lock().expect("watch").clone()
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use replicator::status::StatusBoard;

    fn status(role: Role, state: FtState, released: u64) -> Status {
        let board = StatusBoard::new("n", role);
        board.set_state(role, state, None);
        board.update(|s| s.counters.output_frames_released = released);
        board.snapshot()
    }

    #[test]
    fn two_primaries_releasing_output_together_are_seen() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut judge = Judge::default();
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Protected, 10),
            ms(0),
        );
        judge.observe(
            NodeId::B,
            status(Role::Standby, FtState::StandingBy, 0),
            ms(100),
        );
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Protected, 20),
            ms(200),
        );
        // b promoted while a still releases: two active copies.
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 0),
            ms(300),
        );
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Protected, 30),
            ms(400),
        );
        assert_eq!(judge.seen.two_active, 0, "b released nothing yet");
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 5),
            ms(500),
        );
        assert_eq!(judge.seen.two_active, 1);
        assert!(judge
            .seen
            .first_two_active
            .as_deref()
            .unwrap()
            .contains("node b"));
        assert_eq!(
            judge.seen.states[1],
            ["standby standing-by", "primary unprotected"]
        );
    }

    #[test]
    fn a_primary_that_holds_its_output_is_not_active() {
        let t = Instant::now();
        let ms = |n| t + Duration::from_millis(n);
        let mut judge = Judge::default();
        // a lost its standby: fenced, nothing released; b took over.
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Protected, 10),
            ms(0),
        );
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 0),
            ms(100),
        );
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Fenced, 10),
            ms(200),
        );
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 8),
            ms(300),
        );
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Fenced, 10),
            ms(400),
        );
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 16),
            ms(500),
        );
        assert_eq!(judge.seen.two_active, 0);
        // A fenced copy that lets output out counts.
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Fenced, 11),
            ms(600),
        );
        assert_eq!(judge.seen.two_active, 1);
        // Samples more than a second apart are not "at once".
        let mut judge = Judge::default();
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Protected, 1),
            ms(0),
        );
        judge.observe(
            NodeId::A,
            status(Role::Primary, FtState::Protected, 2),
            ms(100),
        );
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 1),
            ms(1500),
        );
        judge.observe(
            NodeId::B,
            status(Role::Primary, FtState::Unprotected, 2),
            ms(1600),
        );
        assert_eq!(judge.seen.two_active, 0);
    }
}
