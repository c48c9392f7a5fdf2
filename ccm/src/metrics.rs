//! Prometheus metrics of the process. The registry is shared: the HTTP
//! server encodes it from the start, and parts built later (the cloud
//! provider's `cnlb_cloud_api_*` metrics, controllers) register theirs
//! through [`Metrics::registry`].

use std::sync::{Mutex, MutexGuard, PoisonError};

use cnlb_runtime::probes::MetricsText;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Mutex<Registry>,
    kube_api_reachable: Gauge,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();

        // The usual "info" pattern: a constant 1 whose labels carry the data.
        let build_info = Family::<Vec<(String, String)>, Gauge>::default();
        build_info
            .get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        registry.register(
            "cnlb_build_info",
            "Build information of cnlb-ccm (always 1)",
            build_info,
        );

        let kube_api_reachable = Gauge::default();
        registry.register(
            "cnlb_kube_api_reachable",
            "1 if the last request to the Kubernetes API server succeeded, else 0",
            kube_api_reachable.clone(),
        );

        Self {
            registry: Mutex::new(registry),
            kube_api_reachable,
        }
    }

    /// The registry, to register more metrics in; they are served from
    /// then on. Registering happens at start-up: do not hold the guard
    /// across an `.await`.
    pub fn registry(&self) -> MutexGuard<'_, Registry> {
        // Registering and encoding cannot leave the registry half-changed,
        // so a panic elsewhere while it was held does not make it unusable.
        self.registry.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_kube_api_reachable(&self, reachable: bool) {
        self.kube_api_reachable.set(i64::from(reachable));
    }
}

/// What /metrics serves: every registered metric.
impl MetricsText for Metrics {
    fn encode(&self) -> Result<String, std::fmt::Error> {
        self.registry().encode()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_build_info_and_reachability() {
        let metrics = Metrics::new();
        metrics.set_kube_api_reachable(true);
        let text = metrics.encode().unwrap();
        let version = env!("CARGO_PKG_VERSION");
        assert!(
            text.contains(&format!("cnlb_build_info{{version=\"{version}\"}} 1")),
            "{text}"
        );
        assert!(text.contains("cnlb_kube_api_reachable 1"), "{text}");
        assert!(text.ends_with("# EOF\n"), "{text}");
    }

    #[test]
    fn serves_metrics_registered_later() {
        let metrics = Metrics::new();
        let calls = prometheus_client::metrics::counter::Counter::<u64>::default();
        metrics
            .registry()
            .register("cnlb_late", "Registered after start", calls.clone());
        calls.inc();
        let text = metrics.encode().unwrap();
        assert!(text.contains("cnlb_late_total 1"), "{text}");
        assert!(text.contains("cnlb_kube_api_reachable 0"), "{text}");
    }
}
