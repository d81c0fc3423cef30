//! Prometheus metrics (`GET /metrics`, OpenMetrics text). The VMs' figures
//! come from the FT status each role's process reports; they are read at
//! scrape time, so a scrape shows what the engine counted last.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::manager::Manager;
use crate::model::{Maintenance, NodeState};

#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("encoding the metrics failed: {0}")]
    Encode(#[from] std::fmt::Error),
    #[error(transparent)]
    Manager(#[from] crate::manager::ManagerError),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmLabels {
    vm: String,
    role: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VmStateLabels {
    vm: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeLabels {
    node: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NodeStateLabels {
    node: String,
    state: String,
}

/// A histogram whose counts the FT engine keeps (its stop-time buckets),
/// set at scrape time.
#[derive(Clone, Debug, Default)]
struct EngineHistogram(Arc<Mutex<HistogramCounts>>);

/// Sum, count, and (upper bound, count) per bucket.
type HistogramCounts = (f64, u64, Vec<(f64, u64)>);

impl EngineHistogram {
    /// From the engine's per-bucket counts (µs bounds), in seconds.
    fn set(&self, bounds_us: &[u64], counts: &[u64], sum_us: u64) {
        let mut buckets: Vec<(f64, u64)> = bounds_us
            .iter()
            .zip(counts)
            .map(|(&b, &c)| (b as f64 / 1e6, c))
            .collect();
        buckets.push((f64::MAX, counts.get(bounds_us.len()).copied().unwrap_or(0)));
        let count = counts.iter().sum();
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (sum_us as f64 / 1e6, count, buckets);
    }
}

impl prometheus_client::metrics::TypedMetric for EngineHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for EngineHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.0.lock().unwrap_or_else(|e| e.into_inner()).clone();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics text: a
/// counter family `x` is described as `x_total` (its samples' name), and
/// the `# UNIT` and `# EOF` lines go.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let name = rest.split(' ').next()?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total{}", &rest[name.len()..]))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// The metrics endpoint.
#[derive(Default)]
pub struct Metrics {}

fn counter(registry: &mut Registry, name: &str, help: &str) -> Family<VmLabels, Counter> {
    let family = Family::<VmLabels, Counter>::default();
    registry.register(name, help, family.clone());
    family
}

fn gauge(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<VmLabels, Gauge<f64, std::sync::atomic::AtomicU64>> {
    let family = Family::<VmLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register(name, help, family.clone());
    family
}

fn counter_seconds(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<VmLabels, Counter<f64, std::sync::atomic::AtomicU64>> {
    let family = Family::<VmLabels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register_with_unit(name, help, Unit::Seconds, family.clone());
    family
}

fn gauge_seconds(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<VmLabels, Gauge<f64, std::sync::atomic::AtomicU64>> {
    let family = Family::<VmLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register_with_unit(name, help, Unit::Seconds, family.clone());
    family
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {}
    }

    /// The exposition text of this node's metrics now.
    pub fn render(&self, manager: &Manager) -> Result<String, MetricsError> {
        let mut registry = Registry::with_prefix("ftvm");
        let checkpoints = counter(
            &mut registry,
            "checkpoints",
            "Checkpoints committed on the standby (primary) or applied (standby)",
        );
        let stop_p50 = gauge_seconds(
            &mut registry,
            "guest_stop_p50",
            "Guest stop time per checkpoint, median of the recent checkpoints",
        );
        let stop_p99 = gauge_seconds(
            &mut registry,
            "guest_stop_p99",
            "Guest stop time per checkpoint, 99th percentile of the recent checkpoints",
        );
        let stop_histogram = Family::<VmLabels, EngineHistogram>::default();
        registry.register_with_unit(
            "guest_stop",
            "Guest stop time per checkpoint",
            Unit::Seconds,
            stop_histogram.clone(),
        );
        let stop_max = gauge_seconds(
            &mut registry,
            "guest_stop_max",
            "Longest guest stop of a checkpoint",
        );
        let dirty = counter(
            &mut registry,
            "dirty_pages",
            "Dirty pages sent in checkpoints",
        );
        let dirty_last = gauge(
            &mut registry,
            "dirty_pages_last",
            "Dirty pages of the last checkpoint",
        );
        let hot_pages = counter(
            &mut registry,
            "hot_pages",
            "Dirty pages left writable at their checkpoint (hot: written in two checkpoints in a row; no write fault in the next)",
        );
        let delta_pages = counter(
            &mut registry,
            "delta_pages",
            "Of the dirty pages sent in checkpoints, those sent as the words that changed (page deltas)",
        );
        let delta_bytes = counter(
            &mut registry,
            "delta_bytes",
            "Bytes of the page deltas sent in checkpoints (against 4096 a page sent whole)",
        );
        let zero_delta_pages = counter(
            &mut registry,
            "zero_delta_pages",
            "Of the page deltas, those from a page of zeros (mostly-zero pages new to the primary's delta cache)",
        );
        let alink_bytes = counter(
            &mut registry,
            "alink_sent_bytes",
            "Bytes sent on the A-link",
        );
        let sync_sent = counter(
            &mut registry,
            "sync_sent_bytes",
            "Bytes the initial synchronisations sent on the A-link (the copies that protect a VM again)",
        );
        let sync_uncompressed_last = gauge(
            &mut registry,
            "sync_uncompressed_bytes_last",
            "What the last initial synchronisation's memory and disk frames held before compression (against the bytes it sent: the compression ratio)",
        );
        let sync_unread_last = gauge(
            &mut registry,
            "sync_disk_unread_bytes_last",
            "Disk bytes the last initial synchronisation did not read: the same on both nodes by their written maps",
        );
        let sync_memory_unread_last = gauge(
            &mut registry,
            "sync_memory_unread_bytes_last",
            "Guest memory the last initial synchronisation did not read: the standby's memory was brought forward from a checkpoint it held",
        );
        let sync_yielded_last = gauge_seconds(
            &mut registry,
            "sync_disk_yielded_last",
            "How long the last initial synchronisation's disk reads waited for the guest's writes (the copy yields half the disk to a writing guest)",
        );
        let sync_last = gauge_seconds(
            &mut registry,
            "sync_duration_last",
            "How long the last initial synchronisation took (its rate: the bytes it sent over this)",
        );
        let ack_p50 = gauge_seconds(
            &mut registry,
            "ack_latency_p50",
            "From the end of sending a checkpoint to its acknowledgement, median",
        );
        let ack_p99 = gauge_seconds(
            &mut registry,
            "ack_latency_p99",
            "From the end of sending a checkpoint to its acknowledgement, 99th percentile",
        );
        let released = counter(
            &mut registry,
            "output_frames_released",
            "Network frames released to the world after their checkpoint committed",
        );
        let held = gauge(
            &mut registry,
            "output_frames_held",
            "Network frames held now, waiting for their checkpoint",
        );
        let throttled = counter(
            &mut registry,
            "throttled_checkpoints",
            "Checkpoints delayed because the standby had not acknowledged the previous one",
        );
        let rejected = counter(
            &mut registry,
            "epochs_rejected",
            "Checkpoints the standby refused (torn, corrupt, replayed)",
        );
        let audit_pages = counter(
            &mut registry,
            "audit_pages",
            "Pages the standby checked against the primary's page audit of each checkpoint",
        );
        let audit_mismatches = counter(
            &mut registry,
            "audit_mismatches",
            "Checkpoints refused because the replica differed from the primary at an audited page (must stay 0)",
        );
        let failovers = counter(
            &mut registry,
            "failovers",
            "Takeovers by this node's standby",
        );
        let switchovers = counter(
            &mut registry,
            "switchovers",
            "Planned switchovers: the VM handed to the standby (on the primary) or taken over that way",
        );
        let fences = counter(
            &mut registry,
            "fences",
            "Times the primary paused its guest and held its output: neither standby nor witness answered",
        );
        let claims_refused = counter(
            &mut registry,
            "claims_refused",
            "Takeovers the witness held back because it still heard the primary",
        );
        let silence_ends = counter(
            &mut registry,
            "silence_ends",
            "Sessions ended because the peer fell silent (false ones, between live nodes, should be none)",
        );
        let standby_refusals = counter(
            &mut registry,
            "standby_refusals",
            "Sessions the standby refused for a fault of its own (no space for the replica, a failing disk)",
        );
        let standby_drops = counter(
            &mut registry,
            "standby_drops",
            "Sessions the primary ended because the standby did not acknowledge an epoch within the deadline or stopped reading the A-link (its disk or host hung); the VM went on unprotected",
        );
        let behind_pauses = counter(
            &mut registry,
            "behind_pauses",
            "Times the guest was paused because the standby or the A-link fell behind (it ran too long past an unacknowledged checkpoint, or wrote too much to disk since)",
        );
        let behind_paused = counter_seconds(
            &mut registry,
            "behind_paused",
            "Time the guest spent paused because the standby or the A-link fell behind",
        );
        let vcpu_waited = counter_seconds(
            &mut registry,
            "vcpu_waited",
            "Time the guest's vCPUs (on average) were ready to run but waited for a CPU while the rest of the FT engine's process (the engine, the VM's device threads) ran: what the guest loses beyond its stops where they share too few cores",
        );
        let inbound_forwarded = counter(
            &mut registry,
            "inbound_forwarded_frames",
            "Frames the guest received that the primary forwarded to the standby as they arrived (replayed into the guest if the standby takes over past its last checkpoint)",
        );
        let inbound_replayed = counter(
            &mut registry,
            "inbound_replayed_frames",
            "Frames a promoted replica was given that its last checkpoint had not received (its peers did not have to send them again)",
        );
        let inbound_overheard = counter(
            &mut registry,
            "inbound_overheard_frames",
            "Of the frames replayed into a promoted replica, those this node received itself while standing by (the switch flooded them here once the primary's node was gone)",
        );
        let in_flight = gauge(
            &mut registry,
            "epochs_in_flight",
            "Epochs the primary sent that the standby has not acknowledged yet (their output is held)",
        );
        let backlog = gauge(
            &mut registry,
            "epoch_backlog_bytes",
            "Bytes of the epochs in flight: what the A-link and the standby have yet to get through",
        );
        let service_rate = gauge(
            &mut registry,
            "epoch_service_bytes_per_second",
            "The rate the A-link and the standby get epochs through (bytes over the time from when an epoch could be served to its acknowledgement, smoothed; 0 until measured)",
        );
        let generation = gauge(
            &mut registry,
            "generation",
            "The generation of the VM's active copy this node's engine knows",
        );
        let sync_done = gauge(
            &mut registry,
            "sync_done_bytes",
            "Bytes of the initial synchronisation done",
        );
        let sync_total = gauge(
            &mut registry,
            "sync_total_bytes",
            "Bytes of the initial synchronisation in all",
        );
        let sync_rate = gauge(
            &mut registry,
            "sync_rate_bytes_per_second",
            "Bytes of the VM the initial synchronisation goes through per second, so far",
        );
        let takeover_last = gauge_seconds(
            &mut registry,
            "takeover_duration_last",
            "The last takeover by the VM's engine process on this node: from the lost primary's last bytes heard to the promoted guest running (none after a switchover or handover, nor from an engine started since)",
        );
        let takeover_detect_last = gauge_seconds(
            &mut registry,
            "takeover_detect_last",
            "Of the last takeover by the VM's engine process on this node, the silence after which the primary was declared lost",
        );
        let sync_left = gauge_seconds(
            &mut registry,
            "sync_remaining",
            "Time the initial synchronisation needs at its rate so far",
        );
        let epoch = gauge(
            &mut registry,
            "epoch",
            "The last checkpoint (epoch) committed",
        );
        let state = Family::<VmStateLabels, Gauge>::default();
        registry.register(
            "vm_state",
            "1 for the state each VM is in (stopped, syncing, protected, unprotected, ...)",
            state.clone(),
        );
        let protected = Family::<VmStateLabels, Gauge>::default();
        registry.register(
            "vm_protected",
            "1 while the VM runs with a standby holding every checkpoint",
            protected.clone(),
        );
        let peer_up = Family::<NodeLabels, Gauge>::default();
        registry.register(
            "node_peer_reachable",
            "1 while the peer's daemon answers",
            peer_up.clone(),
        );
        let maintenance = Family::<NodeStateLabels, Gauge>::default();
        registry.register(
            "node_maintenance",
            "1 for the maintenance state each node is in (off, entering, on, leaving)",
            maintenance.clone(),
        );
        let witness_up = Gauge::<i64>::default();
        if let Some(reachable) = manager.witness_reachable() {
            witness_up.set(i64::from(reachable));
            registry.register(
                "witness_reachable",
                "1 while the pair's quorum witness answers this node (absent without a witness)",
                witness_up.clone(),
            );
        }

        for view in manager.vms()? {
            let state_name = serde_json::to_value(view.state)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            state
                .get_or_create(&VmStateLabels {
                    vm: view.name.clone(),
                    state: state_name.clone(),
                })
                .set(1);
            protected
                .get_or_create(&VmStateLabels {
                    vm: view.name.clone(),
                    state: state_name,
                })
                .set(i64::from(view.state == crate::model::VmState::Protected));
            let Some(local) = manager.runtime().get(&view.name) else {
                continue;
            };
            let Some(status) = local.status else {
                continue;
            };
            let labels = VmLabels {
                vm: view.name.clone(),
                role: status.role.to_string(),
            };
            let c = &status.counters;
            let n = match status.role {
                replicator::status::Role::Primary => c.checkpoints,
                replicator::status::Role::Standby => c.epochs_applied,
            };
            checkpoints.get_or_create(&labels).inc_by(n);
            let us = |v: u64| v as f64 / 1e6;
            stop_p50.get_or_create(&labels).set(us(c.stop_us_p50));
            stop_p99.get_or_create(&labels).set(us(c.stop_us_p99));
            stop_max.get_or_create(&labels).set(us(c.stop_us_max));
            if !c.stop_us_buckets.is_empty() {
                stop_histogram.get_or_create(&labels).set(
                    &replicator::status::STOP_BUCKETS_US,
                    &c.stop_us_buckets,
                    c.stop_us_sum,
                );
            }
            dirty.get_or_create(&labels).inc_by(c.dirty_pages_total);
            delta_pages
                .get_or_create(&labels)
                .inc_by(c.delta_pages_total);
            delta_bytes
                .get_or_create(&labels)
                .inc_by(c.delta_bytes_total);
            zero_delta_pages
                .get_or_create(&labels)
                .inc_by(c.zero_delta_pages_total);
            dirty_last
                .get_or_create(&labels)
                .set(c.dirty_pages_last as f64);
            alink_bytes
                .get_or_create(&labels)
                .inc_by(c.alink_bytes_sent);
            sync_sent
                .get_or_create(&labels)
                .inc_by(c.sync_sent_bytes_total);
            sync_last
                .get_or_create(&labels)
                .set(c.sync_ms_last as f64 / 1e3);
            sync_uncompressed_last
                .get_or_create(&labels)
                .set(c.sync_uncompressed_bytes_last as f64);
            sync_unread_last
                .get_or_create(&labels)
                .set(c.sync_disk_unread_bytes_last as f64);
            sync_memory_unread_last
                .get_or_create(&labels)
                .set(c.sync_memory_unread_bytes_last as f64);
            sync_yielded_last
                .get_or_create(&labels)
                .set(c.sync_yielded_ms_last as f64 / 1e3);
            ack_p50.get_or_create(&labels).set(us(c.ack_us_p50));
            ack_p99.get_or_create(&labels).set(us(c.ack_us_p99));
            released
                .get_or_create(&labels)
                .inc_by(c.output_frames_released);
            held.get_or_create(&labels)
                .set(c.output_frames_held_now as f64);
            throttled.get_or_create(&labels).inc_by(c.throttled);
            rejected.get_or_create(&labels).inc_by(c.epochs_rejected);
            audit_pages
                .get_or_create(&labels)
                .inc_by(c.audit_pages_total);
            hot_pages.get_or_create(&labels).inc_by(c.hot_pages_total);
            audit_mismatches
                .get_or_create(&labels)
                .inc_by(c.audit_mismatches);
            failovers.get_or_create(&labels).inc_by(c.failovers);
            switchovers.get_or_create(&labels).inc_by(c.switchovers);
            fences.get_or_create(&labels).inc_by(c.fences);
            claims_refused
                .get_or_create(&labels)
                .inc_by(c.claims_refused);
            silence_ends.get_or_create(&labels).inc_by(c.silence_ends);
            standby_refusals
                .get_or_create(&labels)
                .inc_by(c.standby_refusals);
            standby_drops.get_or_create(&labels).inc_by(c.standby_drops);
            behind_pauses.get_or_create(&labels).inc_by(c.behind_pauses);
            behind_paused
                .get_or_create(&labels)
                .inc_by(c.behind_paused_ms as f64 / 1000.0);
            vcpu_waited
                .get_or_create(&labels)
                .inc_by(us(c.vcpu_waited_us_total));
            inbound_forwarded
                .get_or_create(&labels)
                .inc_by(c.inbound_forwarded);
            inbound_replayed
                .get_or_create(&labels)
                .inc_by(c.inbound_replayed);
            inbound_overheard
                .get_or_create(&labels)
                .inc_by(c.inbound_overheard);
            in_flight
                .get_or_create(&labels)
                .set(c.epochs_in_flight_now as f64);
            backlog
                .get_or_create(&labels)
                .set(c.epoch_backlog_bytes_now as f64);
            service_rate
                .get_or_create(&labels)
                .set(c.epoch_service_bytes_per_s as f64);
            generation
                .get_or_create(&labels)
                .set(status.generation as f64);
            epoch.get_or_create(&labels).set(status.epoch as f64);
            if let Some(takeover) = &status.last_takeover {
                if let Some(total) = takeover.total_ms {
                    takeover_last.get_or_create(&labels).set(total as f64 / 1e3);
                }
                if let Some(detect) = takeover.detect_ms {
                    takeover_detect_last
                        .get_or_create(&labels)
                        .set(detect as f64 / 1e3);
                }
            }
            if let Some(sync) = &status.sync {
                sync_done.get_or_create(&labels).set(sync.done_bytes as f64);
                sync_total
                    .get_or_create(&labels)
                    .set(sync.total_bytes as f64);
                sync_rate
                    .get_or_create(&labels)
                    .set(sync.rate_bytes_per_s as f64);
                if let Some(eta) = sync.eta_s {
                    sync_left.get_or_create(&labels).set(eta as f64);
                }
            }
        }
        for node in manager.nodes()? {
            for state in [
                Maintenance::Off,
                Maintenance::Entering,
                Maintenance::On,
                Maintenance::Leaving,
            ] {
                maintenance
                    .get_or_create(&NodeStateLabels {
                        node: node.name.clone(),
                        state: state.as_str().to_string(),
                    })
                    .set(i64::from(node.maintenance == state));
            }
            if !node.local {
                peer_up
                    .get_or_create(&NodeLabels { node: node.name })
                    .set(i64::from(node.state == NodeState::Up));
            }
        }
        let mut out = String::new();
        encode(&mut out, &registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::supervisor::{LocalRole, Runtime};
    use replicator::status::{FtState, Role, StatusBoard};

    /// A node with one protected VM whose engine reported counters.
    fn rendered() -> String {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::fixtures::store_with_vm(dir.path());
        let config = crate::fixtures::pair_config();
        let runtime = Runtime::default();
        let board = StatusBoard::new("node-a", Role::Primary);
        board.update(|s| {
            s.state = FtState::Protected;
            s.epoch = 42;
            s.counters.checkpoints = 42;
            for us in [900, 1_500, 30_000] {
                s.counters.observe_stop(us);
            }
            // A promoted standby: its takeover's figures.
            s.last_takeover = Some(replicator::status::TakeoverTimes {
                at_unix_ms: 1,
                epoch: 41,
                switchover: false,
                detect_ms: Some(201),
                claim_ms: 12,
                promote_ms: 80,
                restore_ms: 60,
                total_ms: Some(293),
            });
        });
        let status = board.snapshot();
        runtime.set(
            "vm1",
            Some(LocalRole {
                role: Role::Primary,
                state: FtState::Protected,
                epoch: Some(42),
                message: None,
                status: Some(status),
            }),
        );
        let manager = Manager::new(config, dir.path(), store, runtime);
        Metrics::new().render(&manager).unwrap()
    }

    #[test]
    fn a_protected_vm_renders_valid_classic_exposition() {
        let open = rendered();
        assert!(
            open.contains("ftvm_checkpoints_total{vm=\"vm1\",role=\"primary\"} 42"),
            "{open}"
        );
        assert!(
            open.contains("ftvm_guest_stop_seconds_count{vm=\"vm1\",role=\"primary\"} 3"),
            "{open}"
        );
        assert!(
            open.contains("ftvm_takeover_duration_last_seconds{vm=\"vm1\",role=\"primary\"} 0.293"),
            "{open}"
        );
        assert!(
            open.contains("ftvm_takeover_detect_last_seconds{vm=\"vm1\",role=\"primary\"} 0.201"),
            "{open}"
        );
        assert!(
            open.contains("ftvm_node_maintenance{node=\"node-a\",state=\"off\"} 1"),
            "{open}"
        );
        assert!(
            open.contains("ftvm_node_maintenance{node=\"node-b\",state=\"on\"} 0"),
            "{open}"
        );
        let classic = classic_text(&open);
        let mut child = std::process::Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("promtool (scripts/test.sh installs Debian's prometheus package)");
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(classic.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}\n{classic}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn counters_are_described_by_their_samples_name_in_the_classic_format() {
        let open = "# HELP ftvm_checkpoints Checkpoints.\n# TYPE ftvm_checkpoints counter\n\
                    ftvm_checkpoints_total{vm=\"x\"} 3\n# HELP ftvm_epoch The epoch.\n\
                    # TYPE ftvm_epoch gauge\n# UNIT ftvm_epoch seconds\nftvm_epoch 2\n# EOF\n";
        let classic = classic_text(open);
        assert_eq!(
            classic,
            "# HELP ftvm_checkpoints_total Checkpoints.\n# TYPE ftvm_checkpoints_total counter\n\
             ftvm_checkpoints_total{vm=\"x\"} 3\n# HELP ftvm_epoch The epoch.\n\
             # TYPE ftvm_epoch gauge\nftvm_epoch 2\n"
        );
    }
}
