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
use crate::model::NodeState;

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
        let alink_bytes = counter(
            &mut registry,
            "alink_sent_bytes",
            "Bytes sent on the A-link",
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
        let failovers = counter(
            &mut registry,
            "failovers",
            "Takeovers by this node's standby",
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
            dirty_last
                .get_or_create(&labels)
                .set(c.dirty_pages_last as f64);
            alink_bytes
                .get_or_create(&labels)
                .inc_by(c.alink_bytes_sent);
            ack_p50.get_or_create(&labels).set(us(c.ack_us_p50));
            ack_p99.get_or_create(&labels).set(us(c.ack_us_p99));
            released
                .get_or_create(&labels)
                .inc_by(c.output_frames_released);
            held.get_or_create(&labels)
                .set(c.output_frames_held_now as f64);
            throttled.get_or_create(&labels).inc_by(c.throttled);
            rejected.get_or_create(&labels).inc_by(c.epochs_rejected);
            failovers.get_or_create(&labels).inc_by(c.failovers);
            epoch.get_or_create(&labels).set(status.epoch as f64);
            if let Some(sync) = &status.sync {
                sync_done.get_or_create(&labels).set(sync.done_bytes as f64);
                sync_total
                    .get_or_create(&labels)
                    .set(sync.total_bytes as f64);
            }
        }
        for node in manager.nodes()? {
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
