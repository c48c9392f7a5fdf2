//! The agent's Prometheus metrics. The AWS backend registers its
//! `cnlb_cloud_api_*` metrics in the same registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::pool::{Counts, Targets};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StateLabel {
    pub state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WatermarkLabel {
    pub watermark: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub command: &'static str,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub operation: &'static str,
    pub result: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    addresses: Family<StateLabel, Gauge>,
    targets: Family<WatermarkLabel, Gauge>,
    pub requests: Family<RequestLabels, Counter>,
    pub add_duration: Histogram,
    /// Part of an ADD or DEL spent on the node's routing (AWS).
    pub route_duration: Histogram,
    pub add_waits: Counter,
    pub backend_operations: Family<OperationLabels, Counter>,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            addresses: Family::default(),
            targets: Family::default(),
            requests: Family::default(),
            // 0.5 ms to 60 s: warm ADDs take about a millisecond, ADDs that
            // wait for the cloud seconds.
            add_duration: Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 5.0, 15.0, 60.0,
            ]),
            route_duration: Histogram::new([
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0, 30.0,
            ]),
            add_waits: Counter::default(),
            backend_operations: Family::default(),
        };
        registry.register(
            "vpc_ipam_addresses",
            "Pod addresses this node holds, by state (free, allocated, cooling, releasing)",
            metrics.addresses.clone(),
        );
        registry.register(
            "vpc_ipam_pool_target",
            "The pool's free-address watermarks (min, warm, max), from the flags or the backend",
            metrics.targets.clone(),
        );
        registry.register(
            "vpc_ipam_requests",
            "Requests from the CNI plugin, by command and result",
            metrics.requests.clone(),
        );
        registry.register_with_unit(
            "vpc_ipam_add_duration",
            "Time the agent took to answer an ADD",
            Unit::Seconds,
            metrics.add_duration.clone(),
        );
        registry.register_with_unit(
            "vpc_ipam_route_duration",
            "Time an ADD or DEL spent on the node's routing (rules, a new ENI's link and table)",
            Unit::Seconds,
            metrics.route_duration.clone(),
        );
        registry.register(
            "vpc_ipam_add_waits",
            "ADDs that found the pool empty and waited for the cloud",
            metrics.add_waits.clone(),
        );
        registry.register(
            "vpc_ipam_backend_operations",
            "Pool changes asked of the backend (acquire, release, reassign, gc), by result",
            metrics.backend_operations.clone(),
        );
        metrics
    }

    pub fn set_counts(&self, counts: Counts) {
        for (state, n) in [
            ("free", counts.free),
            ("allocated", counts.allocated),
            ("cooling", counts.cooling),
            ("releasing", counts.releasing),
        ] {
            self.addresses
                .get_or_create(&StateLabel { state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn set_targets(&self, targets: Targets) {
        for (watermark, n) in [
            ("min", targets.min),
            ("warm", targets.warm),
            ("max", targets.max),
        ] {
            self.targets
                .get_or_create(&WatermarkLabel { watermark })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    pub fn request(&self, command: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.requests
            .get_or_create(&RequestLabels { command, result })
            .inc();
    }

    pub fn backend_operation(&self, operation: &'static str, ok: bool) {
        let result = if ok { "ok" } else { "error" };
        self.backend_operations
            .get_or_create(&OperationLabels { operation, result })
            .inc();
    }
}
