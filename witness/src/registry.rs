//! The witness's rules over its records and what it hears.
//!
//! Time is passed in (`now`), so the rules can be checked without waiting.
//! "Heard" is per VM and node: the last arrival on any connection over which
//! the node asked about the VM (heartbeats included), remembered after the
//! connection closes. A close is not a death: a claim waits for silence
//! even when the owner's connection has closed, because the owner may
//! still hold a lease it got just before.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use ft_link::Liveness;
use tracing::{info, warn};

use crate::protocol::{Answer, Record};
use crate::store::{Ownership, Store, StoreError};

/// The rules' timing.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// How long the owner must be unheard before a claim is granted.
    pub silence: Duration,
    /// After the witness starts, no claim is granted for this long (the
    /// owners reconnect meanwhile; the witness heard nobody before).
    pub startup_grace: Duration,
}

impl Timing {
    /// The lease a primary gets: half the silence, so a lease always ends
    /// before a claim over its holder can be granted.
    pub fn lease(&self) -> Duration {
        self.silence / 2
    }
}

/// What a claim comes to now.
#[derive(Debug, PartialEq, Eq)]
pub enum ClaimStep {
    Decided(Answer),
    /// The owner was heard recently: look again at this instant.
    WaitUntil(Instant),
}

#[derive(Default)]
struct Heard {
    /// The last arrival on connections that have closed.
    last: Option<Instant>,
    /// Connections (by id) over which the node asked about the VM.
    live: Vec<(u64, Liveness)>,
}

pub struct Registry {
    store: Store,
    timing: Timing,
    started: Instant,
    heard: HashMap<(String, String), Heard>,
    /// VMs whose owner handed them over (a planned switchover), with the
    /// generation it released: a claim over it is granted at once. Kept in
    /// memory only: after a restart a claim waits for silence again.
    released: HashMap<String, u64>,
}

fn refused(error: StoreError) -> Answer {
    warn!(%error, "the witness could not record a decision");
    Answer::Refused {
        reason: error.to_string(),
    }
}

impl Registry {
    pub fn new(store: Store, timing: Timing, now: Instant) -> Registry {
        Registry {
            store,
            timing,
            started: now,
            heard: HashMap::new(),
            released: HashMap::new(),
        }
    }

    pub fn timing(&self) -> Timing {
        self.timing
    }

    /// Whether the witness is still in its start-up grace at `now` (it
    /// grants nothing: the owners it has not heard yet may be alive).
    pub fn in_startup_grace(&self, now: Instant) -> bool {
        now < self.started + self.timing.startup_grace
    }

    /// `node` was heard about `vm` at `now`; `conn` (id, liveness) keeps it
    /// heard as long as that connection carries anything.
    pub fn touch(&mut self, vm: &str, node: &str, conn: Option<(u64, &Liveness)>, now: Instant) {
        let heard = self
            .heard
            .entry((vm.to_string(), node.to_string()))
            .or_default();
        heard.last = Some(heard.last.map_or(now, |l| l.max(now)));
        if let Some((id, liveness)) = conn {
            if !heard.live.iter().any(|(i, _)| *i == id) {
                heard.live.push((id, liveness.clone()));
            }
        }
    }

    /// Connection `id` closed: what it carried last is remembered.
    pub fn disconnected(&mut self, id: u64) {
        for heard in self.heard.values_mut() {
            if let Some(at) = heard.live.iter().position(|(i, _)| *i == id) {
                let (_, liveness) = heard.live.remove(at);
                let last = liveness.last_arrival();
                heard.last = Some(heard.last.map_or(last, |l| l.max(last)));
            }
        }
    }

    /// When `node` was last heard about `vm` (none: not since the start).
    fn heard_at(&self, vm: &str, node: &str) -> Option<Instant> {
        let heard = self.heard.get(&(vm.to_string(), node.to_string()))?;
        heard
            .live
            .iter()
            .map(|(_, l)| l.last_arrival())
            .chain(heard.last)
            .max()
    }

    fn lease_ms(&self) -> u64 {
        self.timing.lease().as_millis() as u64
    }

    fn superseded(record: &Ownership) -> Answer {
        Answer::Superseded {
            generation: record.generation,
            owner: record.owner.clone(),
        }
    }

    fn set(&self, vm: &str, generation: u64, owner: &str, why: &str) -> Result<(), StoreError> {
        self.store.set(vm, generation, owner)?;
        info!(vm, generation, owner, why, "generation recorded");
        Ok(())
    }

    /// A primary renews its lease.
    pub fn hold(&mut self, node: &str, vm: &str, generation: u64) -> Answer {
        let record = match self.store.get(vm) {
            Ok(r) => r,
            Err(e) => return refused(e),
        };
        let lease_ms = self.lease_ms();
        if record
            .as_ref()
            .is_some_and(|r| r.owner == node && r.generation == generation)
            && self.released.remove(vm).is_some()
        {
            info!(vm, node, generation, "the owner took its release back");
        }
        match record {
            Some(r) if r.owner == node && r.generation >= generation => Answer::Held {
                generation: r.generation,
                lease_ms,
            },
            Some(r) if r.generation >= generation => Self::superseded(&r),
            // New to the witness, or the witness is behind (it ran without
            // this pair for a while): the primary's word is taken.
            _ => match self.set(vm, generation, node, "a primary holds it") {
                Ok(()) => Answer::Held {
                    generation,
                    lease_ms,
                },
                Err(e) => refused(e),
            },
        }
    }

    /// A primary that lost its standby asks to go on alone.
    pub fn confirm(&mut self, node: &str, vm: &str, generation: u64) -> Answer {
        let record = match self.store.get(vm) {
            Ok(r) => r,
            Err(e) => return refused(e),
        };
        let lease_ms = self.lease_ms();
        match record {
            // Asked again (the answer was lost): the same answer.
            Some(r) if r.owner == node && r.generation > generation => Answer::Confirmed {
                generation: r.generation,
                lease_ms,
            },
            Some(r) if r.owner != node && r.generation >= generation => Self::superseded(&r),
            _ => match self.set(vm, generation + 1, node, "its primary goes on alone") {
                Ok(()) => Answer::Confirmed {
                    generation: generation + 1,
                    lease_ms,
                },
                Err(e) => refused(e),
            },
        }
    }

    /// A standby holding a replica of `generation` asks to take over.
    pub fn claim(&mut self, node: &str, vm: &str, generation: u64, now: Instant) -> ClaimStep {
        let record = match self.store.get(vm) {
            Ok(r) => r,
            Err(e) => return ClaimStep::Decided(refused(e)),
        };
        let not_before = self.started + self.timing.startup_grace;
        let next = match &record {
            // Asked again (the answer was lost): the same answer.
            Some(r) if r.owner == node && r.generation == generation + 1 => {
                return ClaimStep::Decided(Answer::Granted {
                    generation: r.generation,
                    lease_ms: self.lease_ms(),
                })
            }
            // The primary went on alone or another claim won: this
            // replica is stale for good.
            Some(r) if r.generation > generation => return ClaimStep::Decided(Self::superseded(r)),
            // Handed over by its owner: no silence to wait for.
            Some(r) if r.owner != node && self.released.get(vm) == Some(&r.generation) => {
                r.generation.max(generation) + 1
            }
            Some(r) if r.owner != node => {
                let heard = self.heard_at(vm, &r.owner).unwrap_or(self.started);
                let free_at = (heard + self.timing.silence).max(not_before);
                if now < free_at {
                    return ClaimStep::WaitUntil(free_at);
                }
                r.generation.max(generation) + 1
            }
            _ => {
                if now < not_before {
                    return ClaimStep::WaitUntil(not_before);
                }
                generation + 1
            }
        };
        ClaimStep::Decided(match self.set(vm, next, node, "a standby took over") {
            Ok(()) => {
                self.released.remove(vm);
                Answer::Granted {
                    generation: next,
                    lease_ms: self.lease_ms(),
                }
            }
            Err(e) => refused(e),
        })
    }

    /// The owner hands `vm` over to its standby (a planned switchover).
    pub fn release(&mut self, node: &str, vm: &str, generation: u64) -> Answer {
        match self.store.get(vm) {
            Ok(Some(r)) if r.owner == node && r.generation == generation => {
                self.released.insert(vm.to_string(), generation);
                Answer::Released { generation }
            }
            // The owner itself, at a newer generation than its session
            // names (a confirmation whose answer it lost): it still runs
            // the VM, so it is not superseded, but this session's replica
            // is of the older generation and may not take the VM over.
            Ok(Some(r)) if r.owner == node && r.generation > generation => Answer::Refused {
                reason: format!(
                    "node {node} holds VM {vm:?} at generation {}, not {generation}: a \
                     switchover needs a standby at the current generation",
                    r.generation
                ),
            },
            Ok(Some(r)) if r.generation >= generation => Self::superseded(&r),
            Ok(Some(r)) => Answer::Refused {
                reason: format!(
                    "node {node} cannot release generation {generation} of VM {vm:?}: the witness \
                     knows generation {} of node {}",
                    r.generation, r.owner
                ),
            },
            Ok(None) => Answer::Refused {
                reason: format!("no record of VM {vm:?} yet"),
            },
            Err(e) => refused(e),
        }
    }

    /// How long ago the owner of `vm` was heard (for an OwnerHeard answer).
    pub fn owner_heard(&self, vm: &str, now: Instant) -> Answer {
        match self.store.get(vm) {
            Ok(Some(r)) => Answer::OwnerHeard {
                heard_ms_ago: self
                    .heard_at(vm, &r.owner)
                    .map_or(0, |h| now.saturating_duration_since(h).as_millis() as u64),
                owner: r.owner,
            },
            Ok(None) => Answer::Refused {
                reason: format!("no record of VM {vm:?} yet"),
            },
            Err(e) => refused(e),
        }
    }

    /// The operator's override: the next generation to `node`, at once.
    pub fn force(&mut self, node: &str, vm: &str) -> Answer {
        let next = match self.store.get(vm) {
            Ok(r) => r.map_or(1, |r| r.generation + 1),
            Err(e) => return refused(e),
        };
        warn!(
            vm,
            node,
            generation = next,
            "forced grant, without waiting for silence"
        );
        match self.set(vm, next, node, "forced by the operator") {
            // No lease: the owner it overrides may still hold one.
            Ok(()) => Answer::Granted {
                generation: next,
                lease_ms: 0,
            },
            Err(e) => refused(e),
        }
    }

    pub fn show(&self, now: Instant) -> Answer {
        match self.store.all() {
            Ok(all) => Answer::Records {
                records: all
                    .into_iter()
                    .map(|(vm, r)| Record {
                        owner_heard_ms_ago: self
                            .heard_at(&vm, &r.owner)
                            .map(|h| now.saturating_duration_since(h).as_millis() as u64),
                        vm,
                        generation: r.generation,
                        owner: r.owner,
                        updated_unix_ms: r.updated_unix_ms,
                    })
                    .collect(),
                silence_ms: self.timing.silence.as_millis() as u64,
            },
            Err(e) => refused(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SILENCE: Duration = Duration::from_millis(300);

    fn registry(dir: &tempfile::TempDir, now: Instant) -> Registry {
        let store = Store::open(&dir.path().join("w.sqlite")).unwrap();
        let timing = Timing {
            silence: SILENCE,
            startup_grace: Duration::from_secs(2),
        };
        Registry::new(store, timing, now)
    }

    fn granted(step: ClaimStep) -> u64 {
        match step {
            ClaimStep::Decided(Answer::Granted {
                generation,
                lease_ms,
            }) => {
                assert_eq!(lease_ms, 150, "a claim's grant is a lease");
                generation
            }
            other => panic!("expected a grant, got {other:?}"),
        }
    }

    #[test]
    fn a_claim_waits_for_the_owners_silence_and_the_startup_grace() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut r = registry(&dir, t0);
        assert!(matches!(
            r.hold("a", "db", 1),
            Answer::Held {
                generation: 1,
                lease_ms: 150
            }
        ));
        // Heard at 2.5 s: the claim may be granted at 2.8 s, not before.
        let heard = t0 + Duration::from_millis(2500);
        r.touch("db", "a", None, heard);
        assert_eq!(
            r.claim("b", "db", 1, t0 + Duration::from_millis(1000)),
            ClaimStep::WaitUntil(heard + SILENCE)
        );
        assert_eq!(
            r.claim("b", "db", 1, heard + Duration::from_millis(100)),
            ClaimStep::WaitUntil(heard + SILENCE)
        );
        assert_eq!(granted(r.claim("b", "db", 1, heard + SILENCE)), 2);
        // The old primary is told its generation is over.
        assert_eq!(
            r.hold("a", "db", 1),
            Answer::Superseded {
                generation: 2,
                owner: "b".into()
            }
        );
        assert!(matches!(r.confirm("a", "db", 1), Answer::Superseded { .. }));
        // Asking again gives the same grant.
        assert_eq!(granted(r.claim("b", "db", 1, heard + SILENCE)), 2);
    }

    #[test]
    fn a_released_vm_is_granted_to_the_claimant_at_once_and_a_hold_takes_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut r = registry(&dir, t0);
        r.hold("a", "db", 3);
        let after_grace = t0 + Duration::from_secs(3);
        r.touch("db", "a", None, after_grace);
        // Only the owner of that generation may release it.
        assert!(matches!(r.release("b", "db", 3), Answer::Superseded { .. }));
        // Its own older generation: refused, not superseded (see below).
        assert!(matches!(r.release("a", "db", 2), Answer::Refused { .. }));
        assert!(matches!(r.release("a", "db", 9), Answer::Refused { .. }));
        assert!(matches!(r.release("a", "nope", 3), Answer::Refused { .. }));
        // Released, then taken back by a hold: the claim waits again.
        assert_eq!(r.release("a", "db", 3), Answer::Released { generation: 3 });
        r.hold("a", "db", 3);
        assert_eq!(
            r.claim("b", "db", 3, after_grace),
            ClaimStep::WaitUntil(after_grace + SILENCE)
        );
        // Released for good: granted while the owner was heard just now.
        assert_eq!(r.release("a", "db", 3), Answer::Released { generation: 3 });
        assert_eq!(granted(r.claim("b", "db", 3, after_grace)), 4);
        assert!(matches!(r.hold("a", "db", 3), Answer::Superseded { .. }));
        // The release was used up: the next owner's silence counts again.
        r.touch("db", "b", None, after_grace);
        assert_eq!(
            r.claim("a", "db", 4, after_grace),
            ClaimStep::WaitUntil(after_grace + SILENCE)
        );
    }

    #[test]
    fn an_owner_never_heard_since_the_start_is_waited_for_through_the_grace() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        {
            let mut r = registry(&dir, t0);
            r.hold("a", "db", 4);
        }
        // The witness restarted: it has the record, it heard nobody yet.
        let restarted = t0 + Duration::from_secs(60);
        let mut r = registry(&dir, restarted);
        assert_eq!(
            r.claim("b", "db", 4, restarted),
            ClaimStep::WaitUntil(restarted + Duration::from_secs(2))
        );
        assert_eq!(
            granted(r.claim("b", "db", 4, restarted + Duration::from_secs(2))),
            5
        );
    }

    /// A confirmation whose answer the primary never got: its next
    /// renewal at the old generation is answered with the new one (which
    /// ends its session at the old one: see the primary's lease).
    #[test]
    fn a_renewal_at_the_old_generation_names_a_confirmation_whose_answer_was_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = registry(&dir, Instant::now());
        r.hold("a", "db", 1);
        r.confirm("a", "db", 1);
        assert!(matches!(
            r.hold("a", "db", 1),
            Answer::Held { generation: 2, .. }
        ));
    }

    /// A switchover asked by a session older than its node's confirmed
    /// generation is refused, not answered "superseded" (which stops the
    /// only copy): the session ends at the next renewal instead.
    #[test]
    fn a_release_at_a_generation_the_owner_has_moved_past_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut r = registry(&dir, Instant::now());
        r.hold("a", "db", 1);
        r.confirm("a", "db", 1);
        assert!(
            matches!(r.release("a", "db", 1), Answer::Refused { .. }),
            "{:?}",
            r.release("a", "db", 1)
        );
        // Nothing was handed over: the owner holds on at its generation,
        // and another node releasing it is still told who owns it.
        assert!(matches!(
            r.hold("a", "db", 2),
            Answer::Held { generation: 2, .. }
        ));
        assert!(matches!(
            r.release("b", "db", 2),
            Answer::Superseded { generation: 2, .. }
        ));
        assert!(matches!(
            r.release("a", "db", 2),
            Answer::Released { generation: 2 }
        ));
    }

    #[test]
    fn a_confirmed_primary_makes_the_lost_standbys_replica_stale() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut r = registry(&dir, t0);
        r.hold("a", "db", 1);
        assert_eq!(
            r.confirm("a", "db", 1),
            Answer::Confirmed {
                generation: 2,
                lease_ms: 150
            }
        );
        // Asked again: the same generation, not a third one.
        assert!(matches!(
            r.confirm("a", "db", 1),
            Answer::Confirmed { generation: 2, .. }
        ));
        // Long after, the standby of generation 1 claims: refused for good.
        assert_eq!(
            r.claim("b", "db", 1, t0 + Duration::from_secs(100)),
            ClaimStep::Decided(Answer::Superseded {
                generation: 2,
                owner: "a".into()
            })
        );
        // The primary holds on at its new generation.
        assert!(matches!(
            r.hold("a", "db", 2),
            Answer::Held { generation: 2, .. }
        ));
    }

    #[test]
    fn the_newer_generation_wins_and_the_witness_catches_up_when_behind() {
        let dir = tempfile::tempdir().unwrap();
        let t0 = Instant::now();
        let mut r = registry(&dir, t0);
        r.hold("a", "db", 3);
        // b ran generation 5 while the pair had no witness: its word wins.
        assert!(matches!(
            r.hold("b", "db", 5),
            Answer::Held { generation: 5, .. }
        ));
        assert!(matches!(
            r.hold("a", "db", 3),
            Answer::Superseded { generation: 5, .. }
        ));
        // A hold at an equal generation by another node does not take it.
        assert!(matches!(r.hold("a", "db", 5), Answer::Superseded { .. }));
        // The operator's override moves it at once.
        assert_eq!(
            r.force("a", "db"),
            Answer::Granted {
                generation: 6,
                lease_ms: 0
            },
            "a forced grant is no lease"
        );
        assert!(matches!(r.hold("a", "db", 6), Answer::Held { .. }));
    }
}
