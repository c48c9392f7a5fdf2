//! The Service controller's own metrics: how long reconciles take, which
//! errors they end in, and how many Services wait for one.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    kind: &'static str,
}

/// Registered once; cheap to clone (the metrics are shared handles).
#[derive(Clone)]
pub struct ControllerMetrics {
    duration: Histogram,
    errors: Family<ErrorLabels, Counter>,
    queue: Gauge,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self {
            // 5 ms .. ~80 s: a reconcile without cloud calls, up to one
            // that waits for a throttled cloud.
            duration: Histogram::new(exponential_buckets(0.005, 2.0, 15)),
            errors: Family::default(),
            queue: Gauge::default(),
        };
        registry.register(
            "cnlb_reconcile_duration_seconds",
            "Time a Service reconcile took",
            m.duration.clone(),
        );
        registry.register(
            "cnlb_reconcile_errors",
            "Reconciles that ended in an error, by kind",
            m.errors.clone(),
        );
        registry.register(
            "cnlb_reconcile_queue_depth",
            "Services whose reconcile a change triggered and that has not started yet",
            m.queue.clone(),
        );
        m
    }

    pub(super) fn reconciled(&self, took: Duration, error: Option<&'static str>) {
        self.duration.observe(took.as_secs_f64());
        if let Some(kind) = error {
            self.errors.get_or_create(&ErrorLabels { kind }).inc();
        }
    }

    pub(super) fn set_queue_depth(&self, depth: usize) {
        self.queue.set(i64::try_from(depth).unwrap_or(i64::MAX));
    }
}
