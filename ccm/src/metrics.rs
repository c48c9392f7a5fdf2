//! Prometheus metrics of the process. Controllers add their own metrics to
//! this registry when they land.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
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
            registry,
            kube_api_reachable,
        }
    }

    pub fn set_kube_api_reachable(&self, reachable: bool) {
        self.kube_api_reachable.set(i64::from(reachable));
    }

    /// OpenMetrics text exposition of every registered metric.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
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
}
