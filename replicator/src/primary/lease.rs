//! The primary's standing with the quorum witness (when one is configured).
//!
//! - The **keeper** renews a lease all the time (`Hold`, a third of the
//!   lease apart): it keeps this copy heard by the witness, so a standby
//!   that lost only the A-link is refused a takeover; an answer that the
//!   generation is over (`Superseded`) ends this copy.
//! - The **gate** decides, while no epoch of a session is under way, when
//!   the guest's output may leave: held output is released only under a
//!   valid lease (the lease is shorter than the silence the witness waits
//!   for before granting a claim, so a standby can only take over once
//!   this copy's output has stopped). A copy whose lease ran out and
//!   stays out pauses its guest (fenced) until it is renewed.
//! - [`Lease::go_on_alone`]: after a session whose epochs began, the
//!   output the lost standby never acknowledged leaves only once the
//!   witness confirmed that this copy goes on alone (which gives the
//!   generation a new number, so the lost standby's replica can never be
//!   promoted).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;
use tracing::{info, warn};
use vmm::vm::Vm;
use witness::{Answer, Request};

use crate::quorum::{GrantedLease, WitnessConfig};

use crate::status::{FtState, Role, StatusBoard};

/// How often the gate looks at held output (the extra latency output
/// has without a standby, with a witness).
const GATE_TICK: Duration = Duration::from_millis(5);

/// How long a switchover waits for the witness's answer.
const WITNESS_WITHIN: Duration = Duration::from_secs(2);

/// Renewals before the first answer names the lease.
const FIRST_RENEWAL: Duration = Duration::from_millis(50);

/// A copy that never had a lease yet (it just started or was promoted)
/// waits this long for the first one before it fences: the first answer
/// needs a connection first.
const FIRST_LEASE_WITHIN: Duration = Duration::from_secs(2);

/// What the gate does with held output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum GateMode {
    /// Epochs decide (output commit); the gate leaves output alone.
    Off,
    /// Output leaves under a valid lease; with `fence`, a lease that stays
    /// out pauses the guest.
    Lease { fence: bool },
}

struct GateState {
    mode: GateMode,
    /// The gate paused the guest (fenced).
    paused: bool,
}

/// Where this copy stands with the witness.
struct Standing {
    started: Instant,
    generation: AtomicU64,
    lease_until: Mutex<Option<Instant>>,
    lease: Mutex<Duration>,
    superseded: Mutex<Option<(u64, String)>>,
    ended: Notify,
    /// The generation rose (the witness named a newer one for this copy).
    moved: Notify,
    /// Whether the keeper renews the lease (not once the VM was released
    /// to the standby). The keeper holds it while it asks, so a release
    /// is never overtaken by a renewal that would take it back.
    keeping: tokio::sync::Mutex<bool>,
}

impl Standing {
    fn lease_valid(&self, now: Instant) -> bool {
        lock(&self.lease_until).is_some_and(|until| now < until)
    }

    /// How long the lease has been out (none: it holds, or the first one
    /// may still come).
    fn expired_for(&self, now: Instant) -> Option<Duration> {
        match *lock(&self.lease_until) {
            Some(until) if now < until => None,
            Some(until) => Some(now - until),
            // No lease yet: the first may take a connection.
            None if now < self.started + FIRST_LEASE_WITHIN => None,
            None => Some(Duration::MAX),
        }
    }

    fn new(generation: u64) -> Standing {
        Standing {
            started: Instant::now(),
            generation: AtomicU64::new(generation),
            lease_until: Mutex::new(None),
            lease: Mutex::new(Duration::ZERO),
            superseded: Mutex::new(None),
            ended: Notify::new(),
            moved: Notify::new(),
            keeping: tokio::sync::Mutex::new(true),
        }
    }

    fn renewed(&self, generation: u64, until: Instant, lease: Duration) {
        let before = self.generation.fetch_max(generation, Ordering::SeqCst);
        if generation > before {
            self.moved.notify_waiters();
        }
        let mut current = lock(&self.lease_until);
        *current = Some(current.map_or(until, |c| c.max(until)));
        *lock(&self.lease) = lease;
    }

    /// Resolves once the generation is newer than `generation`.
    async fn moved_past(&self, generation: u64) {
        loop {
            let notified = self.moved.notified();
            if self.generation.load(Ordering::SeqCst) > generation {
                return;
            }
            notified.await;
        }
    }

    fn supersede(&self, generation: u64, owner: String) {
        *lock(&self.superseded) = Some((generation, owner));
        *lock(&self.lease_until) = None;
        self.ended.notify_waiters();
        self.ended.notify_one();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What going on alone came to.
pub(super) enum Alone {
    /// Confirmed: the output of the lost session may leave. `standby`: a
    /// standby answered meanwhile (a new session may begin at once).
    Confirmed { standby: bool },
    /// A standby answered first: the new session's first acknowledged
    /// epoch releases what is held.
    StandbyAnswered(Box<(ft_link::Link, usize)>),
    /// Another node runs the VM now.
    Superseded,
}

/// The primary's lease, its keeper and its gate.
pub(super) struct Lease {
    witness: WitnessConfig,
    standing: Arc<Standing>,
    gate: Arc<Mutex<GateState>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.tasks.iter().for_each(|t| t.abort());
    }
}

impl Lease {
    /// Starts renewing and gating: from now on output leaves only under a
    /// lease.
    pub(super) fn start(
        vm: &Arc<Vm>,
        witness: WitnessConfig,
        generation: u64,
        first: Option<GrantedLease>,
        status: &StatusBoard,
    ) -> Lease {
        vm.output().hold();
        let standing = Arc::new(Standing::new(generation));
        if let Some(first) = first {
            // The grant of the takeover counts as the first renewal: output
            // leaves at once, not after a round trip to the witness.
            standing.renewed(generation, first.until, first.length);
        }
        let gate = Arc::new(Mutex::new(GateState {
            mode: GateMode::Lease { fence: true },
            paused: false,
        }));
        status.update(|s| {
            s.generation = generation;
            s.witness = Some(format!("asking {}", witness.client.addrs().join(",")));
        });
        let tasks = vec![
            tokio::spawn(keep(witness.clone(), Arc::clone(&standing), status.clone())),
            tokio::spawn(gate_output(
                Arc::clone(vm),
                Arc::clone(&standing),
                Arc::clone(&gate),
                status.clone(),
            )),
        ];
        Lease {
            witness,
            standing,
            gate,
            tasks,
        }
    }

    /// Waits until the witness first answered (the lease holds, naming
    /// the generation it knows this copy by, or this copy is superseded),
    /// up to the time a first lease may take; a lease started when a
    /// standby connects is so known before its session begins.
    pub(super) async fn first_answer(&self) {
        let until = self.standing.started + FIRST_LEASE_WITHIN;
        loop {
            let now = Instant::now();
            if now >= until || self.standing.lease_valid(now) || self.superseded().is_some() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub(super) fn generation(&self) -> u64 {
        self.standing.generation.load(Ordering::SeqCst)
    }

    /// Resolves once the witness names this copy at a generation newer
    /// than `generation`.
    pub(super) async fn moved_past(&self, generation: u64) {
        self.standing.moved_past(generation).await
    }

    /// The witness says another node runs the VM.
    pub(super) fn superseded(&self) -> Option<(u64, String)> {
        lock(&self.standing.superseded).clone()
    }

    /// Resolves once this copy is superseded.
    pub(super) async fn ended(&self) {
        loop {
            let notified = self.standing.ended.notified();
            if self.superseded().is_some() {
                return;
            }
            notified.await;
        }
    }

    pub(super) fn mode(&self) -> GateMode {
        lock(&self.gate).mode
    }

    /// Sets what the gate does; a guest the gate paused resumes when
    /// fencing ends.
    pub(super) fn set_mode(&self, vm: &Vm, mode: GateMode) {
        let mut gate = lock(&self.gate);
        gate.mode = mode;
        if gate.paused && mode != (GateMode::Lease { fence: true }) {
            vm.resume();
            gate.paused = false;
        }
    }

    /// A planned switchover: stops renewing and tells the witness this
    /// copy hands the VM to its standby, whose claim is then granted at
    /// once. Err: why not (renewing goes on; nothing was handed over).
    pub(super) async fn release(&self) -> Result<(), String> {
        let mut keeping = self.standing.keeping.lock().await;
        let generation = self.generation();
        let request = Request::Release {
            vm: self.witness.vm.clone(),
            generation,
        };
        let why =
            match tokio::time::timeout(WITNESS_WITHIN, self.witness.client.ask(&request)).await {
                Ok(Ok(Answer::Released { .. })) => {
                    *keeping = false;
                    info!(generation, "the witness lets the standby take over at once");
                    return Ok(());
                }
                // This node itself, at a newer generation than the
                // session's (a confirmation whose answer was lost; a
                // witness older than its refusal of this case says so):
                // not superseded. The keeper's next renewal ends the
                // session at the old generation.
                Ok(Ok(Answer::Superseded { generation, owner }))
                    if owner == self.witness.client.node() =>
                {
                    format!(
                        "the witness holds this node at generation {generation}, newer than the \
                         session's: its standby is taken again first"
                    )
                }
                Ok(Ok(Answer::Superseded { generation, owner })) => {
                    self.standing.supersede(generation, owner.clone());
                    format!("node {owner} runs the VM at generation {generation}")
                }
                Ok(Ok(other)) => format!("the witness answered {other:?}"),
                Ok(Err(e)) => format!("the witness cannot be reached: {e}"),
                Err(_) => format!("the witness did not answer within {WITNESS_WITHIN:?}"),
            };
        Err(why)
    }

    /// The switchover failed after [`Lease::release`] but before the
    /// standby was told: takes the VM back (a renewal at this generation
    /// undoes the release, unless the standby claimed meanwhile). True
    /// when this copy still owns the VM.
    pub(super) async fn take_back(&self) -> bool {
        let mut keeping = self.standing.keeping.lock().await;
        let generation = self.generation();
        let request = Request::Hold {
            vm: self.witness.vm.clone(),
            generation,
        };
        let sent = Instant::now();
        match tokio::time::timeout(WITNESS_WITHIN, self.witness.client.ask(&request)).await {
            Ok(Ok(Answer::Held {
                generation,
                lease_ms,
            })) => {
                let lease = Duration::from_millis(lease_ms);
                self.standing.renewed(generation, sent + lease, lease);
                *keeping = true;
                true
            }
            Ok(Ok(Answer::Superseded { generation, owner })) => {
                self.standing.supersede(generation, owner);
                false
            }
            // Unknown: this copy cannot tell whether the standby claimed.
            _ => false,
        }
    }

    /// After a session whose epochs began: asks the witness to go on alone
    /// (the guest is paused and its output held while neither it nor a
    /// standby answers), or takes a standby that answers first.
    pub(super) async fn go_on_alone(
        &self,
        vm: &Vm,
        config: &super::PrimaryConfig,
        status: &StatusBoard,
    ) -> Alone {
        let mut fenced = false;
        loop {
            if self.superseded().is_some() {
                return Alone::Superseded;
            }
            let error = match self.confirm(status).await {
                Ok(Verdict::Confirmed) => {
                    if fenced {
                        vm.resume();
                    }
                    return Alone::Confirmed { standby: false };
                }
                Ok(Verdict::Superseded) => return Alone::Superseded,
                Err(error) => error,
            };
            if !fenced {
                vm.pause();
                fenced = true;
                warn!(%error, "standby lost and the witness unreachable: fenced (guest paused, output held)");
                status.update(|s| s.counters.fences += 1);
                status.set_state(
                    Role::Primary,
                    FtState::Fenced,
                    Some(format!(
                        "the standby is lost and the witness cannot be reached ({error}): \
                         the guest is paused and its output held until one of them answers"
                    )),
                );
            }
            status.update(|s| s.witness = Some(format!("unreachable: {error}")));
            // A standby that answers ends the fence too.
            if let Ok((link, active)) = super::connect_any(&config.peers, &config.link).await {
                info!("a standby answered while fenced: resynchronising it");
                // The witness is often back with it (a cut of every path
                // heals at once): its confirmation lets the held output
                // go now, not after the new session's copy (seconds, or
                // minutes for a large VM). The session then begins at the
                // new generation on a link made afresh: this one would sit
                // idle during the ask, longer than the standby waits for
                // a session's first word. The guest stays paused through
                // the ask (at most WITNESS_WITHIN): should the witness
                // say another node runs the VM, this copy never ran
                // beside it.
                let asked = tokio::time::timeout(WITNESS_WITHIN, self.confirm(status)).await;
                let verdict = asked.unwrap_or_else(|_| {
                    Err(format!(
                        "the witness did not answer within {WITNESS_WITHIN:?}"
                    ))
                });
                return match verdict {
                    Ok(Verdict::Confirmed) => {
                        vm.resume();
                        Alone::Confirmed { standby: true }
                    }
                    Ok(Verdict::Superseded) => Alone::Superseded,
                    Err(error) => {
                        warn!(%error, "the witness still cannot be reached: the held output waits for the standby's first acknowledged epoch");
                        status.update(|s| s.witness = Some(format!("unreachable: {error}")));
                        vm.resume();
                        Alone::StandbyAnswered(Box::new((link, active)))
                    }
                };
            }
            tokio::time::sleep(config.retry_every.min(Duration::from_millis(300))).await;
        }
    }

    /// Asks the witness to confirm that this copy goes on alone, at a new
    /// generation (the lost standby's claim is refused from then on).
    async fn confirm(&self, status: &StatusBoard) -> Result<Verdict, String> {
        let generation = self.generation();
        let sent = Instant::now();
        let request = Request::Confirm {
            vm: self.witness.vm.clone(),
            generation,
        };
        match self.witness.client.ask(&request).await {
            Ok(Answer::Confirmed {
                generation,
                lease_ms,
            }) => {
                let lease = Duration::from_millis(lease_ms);
                self.standing.renewed(generation, sent + lease, lease);
                info!(generation, "the witness confirmed: going on alone");
                status.update(|s| {
                    s.generation = generation;
                    s.witness = Some(format!("confirmed alone at generation {generation}"));
                });
                Ok(Verdict::Confirmed)
            }
            Ok(Answer::Superseded { generation, owner }) => {
                self.standing.supersede(generation, owner);
                Ok(Verdict::Superseded)
            }
            Ok(other) => Err(format!("unexpected answer {other:?}")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// The witness's answer to a confirmation.
enum Verdict {
    Confirmed,
    Superseded,
}

/// Renews the lease until the witness says the generation is over.
async fn keep(witness: WitnessConfig, standing: Arc<Standing>, status: StatusBoard) {
    let mut shown = String::new();
    let mut every = FIRST_RENEWAL;
    loop {
        let keeping = standing.keeping.lock().await;
        if !*keeping {
            // Released to the standby: this copy holds nothing any more.
            drop(keeping);
            tokio::time::sleep(every).await;
            continue;
        }
        let generation = standing.generation.load(Ordering::SeqCst);
        let sent = Instant::now();
        let request = Request::Hold {
            vm: witness.vm.clone(),
            generation,
        };
        let asked = witness.client.ask(&request).await;
        drop(keeping);
        let now_shown = match asked {
            Ok(Answer::Held {
                generation,
                lease_ms,
            }) => {
                let lease = Duration::from_millis(lease_ms);
                standing.renewed(generation, sent + lease, lease);
                every = (lease / 3).max(Duration::from_millis(10));
                status.update(|s| s.generation = s.generation.max(generation));
                format!("lease held at generation {generation}")
            }
            Ok(Answer::Superseded { generation, owner }) => {
                warn!(
                    generation,
                    owner, "the witness says another node runs this VM now"
                );
                status.update(|s| {
                    s.witness = Some(format!(
                        "superseded: node {owner} runs the VM at generation {generation}"
                    ))
                });
                standing.supersede(generation, owner);
                return;
            }
            Ok(other) => format!("unexpected answer {other:?}"),
            Err(e) => format!("unreachable: {e}"),
        };
        if now_shown != shown {
            info!(witness = now_shown, "witness");
            status.update(|s| s.witness = Some(now_shown.clone()));
            shown = now_shown;
        }
        tokio::time::sleep(every.saturating_sub(sent.elapsed())).await;
    }
}

/// Releases held output under the lease; fences a copy whose lease stays
/// out.
async fn gate_output(
    vm: Arc<Vm>,
    standing: Arc<Standing>,
    gate: Arc<Mutex<GateState>>,
    status: StatusBoard,
) {
    let mut tick = tokio::time::interval(GATE_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = Instant::now();
        let mut gate = lock(&gate);
        if lock(&standing.superseded).is_some() {
            // Never released: another copy runs the VM.
            vm.output().discard_held();
            gate.mode = GateMode::Off;
            continue;
        }
        let GateMode::Lease { fence } = gate.mode else {
            continue;
        };
        if standing.lease_valid(now) {
            vm.output().seal(0);
            let released = vm.output().release_through(0);
            if released > 0 {
                status.update(|s| s.counters.output_frames_released += released as u64);
            }
            if gate.paused {
                vm.resume();
                gate.paused = false;
                info!("lease renewed: fence lifted");
                status.set_state(Role::Primary, FtState::Unprotected, None);
            }
            continue;
        }
        // Out of lease: output waits. Fenced once it stays out as long
        // again as a lease lasts.
        let lease = *lock(&standing.lease);
        let Some(out_for) = standing.expired_for(now) else {
            continue;
        };
        if fence && !gate.paused && out_for > lease.max(GATE_TICK * 4) {
            vm.pause();
            gate.paused = true;
            warn!(
                out_ms = out_for.as_millis().min(u64::MAX as u128) as u64,
                "no lease from the witness: fenced (guest paused, output held)"
            );
            status.update(|s| s.counters.fences += 1);
            status.set_state(
                Role::Primary,
                FtState::Fenced,
                Some(
                    "no standby and no lease from the witness: the guest is paused and its \
                     output held until the witness answers"
                        .into(),
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A confirmation whose answer was lost leaves the witness a
    /// generation ahead of the session; the keeper's next renewal names
    /// it, and the session learns it (it ends, and the standby is taken
    /// again at the generation the witness knows, or its claim would be
    /// refused as stale).
    #[tokio::test]
    async fn a_session_learns_that_the_witness_moved_this_copys_generation() {
        let standing = Arc::new(Standing::new(3));
        let waiting = {
            let standing = Arc::clone(&standing);
            tokio::spawn(async move { standing.moved_past(3).await })
        };
        let lease = Duration::from_millis(100);
        // Renewals at the session's generation (or an older answer) move
        // nothing.
        standing.renewed(3, Instant::now() + lease, lease);
        standing.renewed(2, Instant::now() + lease, lease);
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished());
        standing.renewed(4, Instant::now() + lease, lease);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("the move was noticed")
            .unwrap();
        // Already past: at once.
        tokio::time::timeout(Duration::from_secs(5), standing.moved_past(3))
            .await
            .expect("at once");
    }

    /// A witness over a real link that answers every request with
    /// `answer`.
    async fn scripted_witness(answer: Answer) -> (String, tokio::task::JoinHandle<()>) {
        let secret = ft_link::PairSecret::new(b"lease-test-secret-0123456789xx".to_vec()).unwrap();
        let config = ft_link::LinkConfig::new(secret, witness::protocol::witness_hello("w"));
        let listener = ft_link::LinkListener::bind("127.0.0.1:0", config)
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let task = tokio::spawn(async move {
            while let Ok(mut link) = listener.accept().await {
                let answer = answer.clone();
                tokio::spawn(async move {
                    while let Ok(frame) = link.recv().await {
                        let (id, _) = Request::from_frame(&frame).unwrap();
                        if link.send(&answer.to_frame(id).unwrap()).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    /// A lease of node "a" at `generation`, without its keeper and gate.
    fn lease_of_a(addr: String, generation: u64) -> Lease {
        let secret = ft_link::PairSecret::new(b"lease-test-secret-0123456789xx".to_vec()).unwrap();
        let client = witness::WitnessClient::new(vec![addr], secret, "a", Duration::from_secs(5));
        Lease {
            witness: WitnessConfig {
                client: Arc::new(client),
                vm: "db".into(),
            },
            standing: Arc::new(Standing::new(generation)),
            gate: Arc::new(Mutex::new(GateState {
                mode: GateMode::Off,
                paused: false,
            })),
            tasks: Vec::new(),
        }
    }

    /// A witness older than its refusal of a stale release names this very
    /// node as the newer generation's owner: the switchover is called off,
    /// and this copy is not ended (it is the only copy running). Another
    /// node named ends it.
    #[tokio::test]
    async fn a_release_superseded_by_this_node_itself_calls_the_switchover_off() {
        let (addr, witness) = scripted_witness(Answer::Superseded {
            generation: 4,
            owner: "a".into(),
        })
        .await;
        let lease = lease_of_a(addr, 3);
        let why = lease.release().await.expect_err("nothing was handed over");
        assert!(why.contains("holds this node at generation 4"), "{why}");
        assert_eq!(lease.superseded(), None, "this copy must not end itself");
        assert!(*lease.standing.keeping.lock().await, "renewing goes on");
        witness.abort();

        let (addr, witness) = scripted_witness(Answer::Superseded {
            generation: 4,
            owner: "b".into(),
        })
        .await;
        let lease = lease_of_a(addr, 3);
        let why = lease.release().await.expect_err("nothing was handed over");
        assert!(why.contains("node b runs the VM"), "{why}");
        assert_eq!(lease.superseded(), Some((4, "b".into())));
        witness.abort();
    }
}
