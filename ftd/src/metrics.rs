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

use replicator::status::{Role, Status};

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

/// How one of a VM's metrics is read from its engine's status, and so
/// what kind of metric it is.
enum Read {
    /// A counter (events, pages, bytes).
    Count(fn(&Status) -> u64),
    /// A counter of seconds.
    Seconds(fn(&Status) -> f64),
    /// A gauge; none: no sample.
    Level(fn(&Status) -> Option<f64>),
    /// A gauge of seconds; none: no sample.
    LevelSeconds(fn(&Status) -> Option<f64>),
    /// The engine's stop-time histogram.
    StopHistogram,
}

/// One of each VM's metrics: its name (after `ftvm_`), its help, and how
/// it is read.
struct VmMetric {
    name: &'static str,
    help: &'static str,
    read: Read,
}

/// Microseconds as seconds.
fn us(v: u64) -> f64 {
    v as f64 / 1e6
}

/// Milliseconds as seconds.
fn ms(v: u64) -> f64 {
    v as f64 / 1e3
}

/// Each VM's metrics, in the order they are exposed.
const VM_METRICS: &[VmMetric] = &[
    VmMetric {
        name: "checkpoints",
        help: "Checkpoints committed on the standby (primary) or applied (standby)",
        read: Read::Count(|s| match s.role {
            Role::Primary => s.counters.checkpoints,
            Role::Standby => s.counters.epochs_applied,
        }),
    },
    VmMetric {
        name: "guest_stop_p50",
        help: "Guest stop time per checkpoint, median of the recent checkpoints",
        read: Read::LevelSeconds(|s| Some(us(s.counters.stop_us_p50))),
    },
    VmMetric {
        name: "guest_stop_p99",
        help: "Guest stop time per checkpoint, 99th percentile of the recent checkpoints",
        read: Read::LevelSeconds(|s| Some(us(s.counters.stop_us_p99))),
    },
    VmMetric {
        name: "guest_stop",
        help: "Guest stop time per checkpoint",
        read: Read::StopHistogram,
    },
    VmMetric {
        name: "guest_stop_max",
        help: "Longest guest stop of a checkpoint",
        read: Read::LevelSeconds(|s| Some(us(s.counters.stop_us_max))),
    },
    VmMetric {
        name: "dirty_pages",
        help: "Dirty pages sent in checkpoints",
        read: Read::Count(|s| s.counters.dirty_pages_total),
    },
    VmMetric {
        name: "dirty_pages_last",
        help: "Dirty pages of the last checkpoint",
        read: Read::Level(|s| Some(s.counters.dirty_pages_last as f64)),
    },
    VmMetric {
        name: "hot_pages",
        help: "Dirty pages left writable at their checkpoint (hot: written in two checkpoints in a row; no write fault in the next)",
        read: Read::Count(|s| s.counters.hot_pages_total),
    },
    VmMetric {
        name: "delta_pages",
        help: "Of the dirty pages sent in checkpoints, those sent as the words that changed (page deltas)",
        read: Read::Count(|s| s.counters.delta_pages_total),
    },
    VmMetric {
        name: "delta_bytes",
        help: "Bytes of the page deltas sent in checkpoints (against 4096 a page sent whole)",
        read: Read::Count(|s| s.counters.delta_bytes_total),
    },
    VmMetric {
        name: "zero_delta_pages",
        help: "Of the page deltas, those from a page of zeros (mostly-zero pages new to the primary's delta cache)",
        read: Read::Count(|s| s.counters.zero_delta_pages_total),
    },
    VmMetric {
        name: "alink_sent_bytes",
        help: "Bytes sent on the A-link",
        read: Read::Count(|s| s.counters.alink_bytes_sent),
    },
    VmMetric {
        name: "sync_sent_bytes",
        help: "Bytes the initial synchronisations sent on the A-link (the copies that protect a VM again)",
        read: Read::Count(|s| s.counters.sync_sent_bytes_total),
    },
    VmMetric {
        name: "sync_uncompressed_bytes_last",
        help: "What the last initial synchronisation's memory and disk frames held before compression (against the bytes it sent: the compression ratio)",
        read: Read::Level(|s| Some(s.counters.sync_uncompressed_bytes_last as f64)),
    },
    VmMetric {
        name: "sync_disk_unread_bytes_last",
        help: "Disk bytes the last initial synchronisation did not read: the same on both nodes by their written maps",
        read: Read::Level(|s| Some(s.counters.sync_disk_unread_bytes_last as f64)),
    },
    VmMetric {
        name: "sync_memory_unread_bytes_last",
        help: "Guest memory the last initial synchronisation did not read: the standby's memory was brought forward from a checkpoint it held",
        read: Read::Level(|s| Some(s.counters.sync_memory_unread_bytes_last as f64)),
    },
    VmMetric {
        name: "sync_disk_yielded_last",
        help: "How long the last initial synchronisation's disk reads waited for the guest's writes (the copy yields half the disk to a writing guest)",
        read: Read::LevelSeconds(|s| Some(ms(s.counters.sync_yielded_ms_last))),
    },
    VmMetric {
        name: "sync_duration_last",
        help: "How long the last initial synchronisation took (its rate: the bytes it sent over this)",
        read: Read::LevelSeconds(|s| Some(ms(s.counters.sync_ms_last))),
    },
    VmMetric {
        name: "ack_latency_p50",
        help: "From the end of sending a checkpoint to its acknowledgement, median",
        read: Read::LevelSeconds(|s| Some(us(s.counters.ack_us_p50))),
    },
    VmMetric {
        name: "ack_latency_p99",
        help: "From the end of sending a checkpoint to its acknowledgement, 99th percentile",
        read: Read::LevelSeconds(|s| Some(us(s.counters.ack_us_p99))),
    },
    VmMetric {
        name: "output_frames_released",
        help: "Network frames released to the world after their checkpoint committed",
        read: Read::Count(|s| s.counters.output_frames_released),
    },
    VmMetric {
        name: "output_frames_held",
        help: "Network frames held now, waiting for their checkpoint",
        read: Read::Level(|s| Some(s.counters.output_frames_held_now as f64)),
    },
    VmMetric {
        name: "throttled_checkpoints",
        help: "Checkpoints delayed because the standby had not acknowledged the previous one",
        read: Read::Count(|s| s.counters.throttled),
    },
    VmMetric {
        name: "epochs_rejected",
        help: "Checkpoints the standby refused (torn, corrupt, replayed)",
        read: Read::Count(|s| s.counters.epochs_rejected),
    },
    VmMetric {
        name: "audit_pages",
        help: "Pages the standby checked against the primary's page audit of each checkpoint",
        read: Read::Count(|s| s.counters.audit_pages_total),
    },
    VmMetric {
        name: "audit_mismatches",
        help: "Checkpoints refused because the replica differed from the primary at an audited page (must stay 0)",
        read: Read::Count(|s| s.counters.audit_mismatches),
    },
    VmMetric {
        name: "failovers",
        help: "Takeovers by this node's standby",
        read: Read::Count(|s| s.counters.failovers),
    },
    VmMetric {
        name: "switchovers",
        help: "Planned switchovers: the VM handed to the standby (on the primary) or taken over that way",
        read: Read::Count(|s| s.counters.switchovers),
    },
    VmMetric {
        name: "fences",
        help: "Times the primary paused its guest and held its output: neither standby nor witness answered",
        read: Read::Count(|s| s.counters.fences),
    },
    VmMetric {
        name: "claims_refused",
        help: "Takeovers the witness held back because it still heard the primary",
        read: Read::Count(|s| s.counters.claims_refused),
    },
    VmMetric {
        name: "silence_ends",
        help: "Sessions ended because the peer fell silent (false ones, between live nodes, should be none)",
        read: Read::Count(|s| s.counters.silence_ends),
    },
    VmMetric {
        name: "standby_refusals",
        help: "Sessions the standby refused for a fault of its own (no space for the replica, a failing disk)",
        read: Read::Count(|s| s.counters.standby_refusals),
    },
    VmMetric {
        name: "standby_drops",
        help: "Sessions the primary ended because the standby did not acknowledge an epoch within the deadline or stopped reading the A-link (its disk or host hung); the VM went on unprotected",
        read: Read::Count(|s| s.counters.standby_drops),
    },
    VmMetric {
        name: "behind_pauses",
        help: "Times the guest was paused because the standby or the A-link fell behind (it ran too long past an unacknowledged checkpoint, or wrote too much to disk since)",
        read: Read::Count(|s| s.counters.behind_pauses),
    },
    VmMetric {
        name: "behind_paused",
        help: "Time the guest spent paused because the standby or the A-link fell behind",
        read: Read::Seconds(|s| ms(s.counters.behind_paused_ms)),
    },
    VmMetric {
        name: "vcpu_waited",
        help: "Time the guest's vCPUs (on average) were ready to run but waited for a CPU while the rest of the FT engine's process (the engine, the VM's device threads) ran: what the guest loses beyond its stops where they share too few cores",
        read: Read::Seconds(|s| us(s.counters.vcpu_waited_us_total)),
    },
    VmMetric {
        name: "inbound_forwarded_frames",
        help: "Frames the guest received that the primary forwarded to the standby as they arrived (replayed into the guest if the standby takes over past its last checkpoint)",
        read: Read::Count(|s| s.counters.inbound_forwarded),
    },
    VmMetric {
        name: "inbound_replayed_frames",
        help: "Frames a promoted replica was given that its last checkpoint had not received (its peers did not have to send them again)",
        read: Read::Count(|s| s.counters.inbound_replayed),
    },
    VmMetric {
        name: "inbound_overheard_frames",
        help: "Of the frames replayed into a promoted replica, those this node received itself while standing by (the switch flooded them here once the primary's node was gone)",
        read: Read::Count(|s| s.counters.inbound_overheard),
    },
    VmMetric {
        name: "epochs_in_flight",
        help: "Epochs the primary sent that the standby has not acknowledged yet (their output is held)",
        read: Read::Level(|s| Some(s.counters.epochs_in_flight_now as f64)),
    },
    VmMetric {
        name: "epoch_backlog_bytes",
        help: "Bytes of the epochs in flight: what the A-link and the standby have yet to get through",
        read: Read::Level(|s| Some(s.counters.epoch_backlog_bytes_now as f64)),
    },
    VmMetric {
        name: "epoch_service_bytes_per_second",
        help: "The rate the A-link and the standby get epochs through (bytes over the time from when an epoch could be served to its acknowledgement, smoothed; 0 until measured)",
        read: Read::Level(|s| Some(s.counters.epoch_service_bytes_per_s as f64)),
    },
    VmMetric {
        name: "generation",
        help: "The generation of the VM's active copy this node's engine knows",
        read: Read::Level(|s| Some(s.generation as f64)),
    },
    VmMetric {
        name: "sync_done_bytes",
        help: "Bytes of the initial synchronisation done",
        read: Read::Level(|s| s.sync.as_ref().map(|p| p.done_bytes as f64)),
    },
    VmMetric {
        name: "sync_total_bytes",
        help: "Bytes of the initial synchronisation in all",
        read: Read::Level(|s| s.sync.as_ref().map(|p| p.total_bytes as f64)),
    },
    VmMetric {
        name: "sync_rate_bytes_per_second",
        help: "Bytes of the VM the initial synchronisation goes through per second, so far",
        read: Read::Level(|s| s.sync.as_ref().map(|p| p.rate_bytes_per_s as f64)),
    },
    VmMetric {
        name: "takeover_duration_last",
        help: "The last takeover by the VM's engine process on this node: from the lost primary's last bytes heard to the promoted guest running (none after a switchover or handover, nor from an engine started since)",
        read: Read::LevelSeconds(|s| s.last_takeover.as_ref()?.total_ms.map(ms)),
    },
    VmMetric {
        name: "takeover_detect_last",
        help: "Of the last takeover by the VM's engine process on this node, the silence after which the primary was declared lost",
        read: Read::LevelSeconds(|s| s.last_takeover.as_ref()?.detect_ms.map(ms)),
    },
    VmMetric {
        name: "sync_remaining",
        help: "Time the initial synchronisation needs at its rate so far",
        read: Read::LevelSeconds(|s| s.sync.as_ref()?.eta_s.map(|eta| eta as f64)),
    },
    VmMetric {
        name: "epoch",
        help: "The last checkpoint (epoch) committed",
        read: Read::Level(|s| Some(s.epoch as f64)),
    },
];

/// A float gauge or counter's value (the families below).
type F64 = std::sync::atomic::AtomicU64;

/// A [`VmMetric`] registered for one rendering, with how it is read.
enum Registered {
    Count(Family<VmLabels, Counter>, fn(&Status) -> u64),
    Seconds(Family<VmLabels, Counter<f64, F64>>, fn(&Status) -> f64),
    Level(
        Family<VmLabels, Gauge<f64, F64>>,
        fn(&Status) -> Option<f64>,
    ),
    StopHistogram(Family<VmLabels, EngineHistogram>),
}

impl Registered {
    fn new(registry: &mut Registry, metric: &VmMetric) -> Registered {
        /// `family`, registered as `metric` (of seconds or not).
        fn add<M: prometheus_client::registry::Metric + Clone>(
            registry: &mut Registry,
            metric: &VmMetric,
            seconds: bool,
            family: M,
        ) -> M {
            if seconds {
                registry.register_with_unit(
                    metric.name,
                    metric.help,
                    Unit::Seconds,
                    family.clone(),
                );
            } else {
                registry.register(metric.name, metric.help, family.clone());
            }
            family
        }
        match metric.read {
            Read::Count(read) => {
                Registered::Count(add(registry, metric, false, Family::default()), read)
            }
            Read::Seconds(read) => {
                Registered::Seconds(add(registry, metric, true, Family::default()), read)
            }
            Read::Level(read) => {
                Registered::Level(add(registry, metric, false, Family::default()), read)
            }
            Read::LevelSeconds(read) => {
                Registered::Level(add(registry, metric, true, Family::default()), read)
            }
            Read::StopHistogram => {
                Registered::StopHistogram(add(registry, metric, true, Family::default()))
            }
        }
    }

    /// Sets the sample of the VM `labels` names from its engine's status.
    fn record(&self, labels: &VmLabels, status: &Status) {
        match self {
            Registered::Count(family, read) => {
                family.get_or_create(labels).inc_by(read(status));
            }
            Registered::Seconds(family, read) => {
                family.get_or_create(labels).inc_by(read(status));
            }
            Registered::Level(family, read) => {
                if let Some(value) = read(status) {
                    family.get_or_create(labels).set(value);
                }
            }
            Registered::StopHistogram(family) => {
                let c = &status.counters;
                if !c.stop_us_buckets.is_empty() {
                    family.get_or_create(labels).set(
                        &replicator::status::STOP_BUCKETS_US,
                        &c.stop_us_buckets,
                        c.stop_us_sum,
                    );
                }
            }
        }
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        Metrics {}
    }

    /// The exposition text of this node's metrics now.
    pub fn render(&self, manager: &Manager) -> Result<String, MetricsError> {
        let mut registry = Registry::with_prefix("ftvm");
        let vm_metrics: Vec<Registered> = VM_METRICS
            .iter()
            .map(|metric| Registered::new(&mut registry, metric))
            .collect();
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
            for metric in &vm_metrics {
                metric.record(&labels, &status);
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
