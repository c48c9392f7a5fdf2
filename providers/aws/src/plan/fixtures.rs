//! Test fixtures shared by the plan's tests.

use cnlb_provider_core::{Listener, LoadBalancerKey, Protocol};

pub(crate) fn key() -> LoadBalancerKey {
    LoadBalancerKey::new("c", "default", "web", "uid-1")
}

/// A listener to target port 8080.
pub(crate) fn listener(port: u16, protocol: Protocol) -> Listener {
    Listener {
        name: "http".into(),
        protocol,
        port,
        target_port: 8080,
    }
}
