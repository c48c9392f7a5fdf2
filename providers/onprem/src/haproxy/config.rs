//! Renders the whole HAProxy configuration from the provider's [`State`]:
//! a pure function, so what a restart loads is exactly what the runtime
//! API was told, and a change that needs a reload (a frontend or backend
//! appearing, going or changing) shows as a difference in the text.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use cnlb_provider_core::{HealthCheckPort, HealthCheckProtocol};

use super::state::{LbState, State};

/// The configuration file for `state`, with the runtime API on
/// `runtime_socket`.
pub fn render(state: &State, runtime_socket: &Path) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write!(
        out,
        "# Written by cnlb-onprem-haproxy from its state file; edits are overwritten.\n\
         global\n\
         \x20   stats socket {} mode 600 level admin expose-fd listeners\n\
         \x20   stats timeout 30s\n\
         \n\
         defaults\n\
         \x20   mode tcp\n\
         \x20   timeout connect 5s\n\
         \x20   timeout client 1m\n\
         \x20   timeout server 1m\n",
        runtime_socket.display()
    );
    for lb in state.load_balancers.values() {
        render_lb(&mut out, lb);
    }
    out
}

fn render_lb(out: &mut String, lb: &LbState) {
    let key = &lb.spec.key;
    for listener in &lb.spec.listeners {
        let name = lb.proxy_name(listener.port);
        let _ = write!(
            out,
            "\nfrontend {name}\n\
             \x20   # cnlb.dev/service={} cnlb.dev/service-uid={} listener={:?}\n\
             \x20   bind {}\n",
            key.service(),
            key.uid,
            listener.name,
            addr(SocketAddr::new(lb.address, listener.port)),
        );
        if !lb.spec.source_ranges.is_empty() {
            let _ = write!(
                out,
                "    acl cnlb_allowed src {}\n    tcp-request connection reject unless cnlb_allowed\n",
                lb.spec.source_ranges.join(" ")
            );
        }
        let _ = write!(out, "    default_backend {name}\n\nbackend {name}\n");
        // Servers are added at runtime, which needs a dynamic algorithm.
        out.push_str("    balance roundrobin\n");
        let hc = &lb.spec.health_check;
        let _ = writeln!(out, "    timeout check {}", millis(hc.timeout));
        if hc.protocol != HealthCheckProtocol::Tcp {
            let _ = write!(
                out,
                "    option httpchk\n    http-check send meth GET uri {}\n    http-check expect status {}\n",
                hc.path.as_deref().unwrap_or("/"),
                hc.success_codes
            );
        }
        let servers = lb.servers.get(&listener.port).into_iter().flatten();
        for server in servers {
            let _ = writeln!(
                out,
                "    server {} {} {}",
                server_name(*server),
                addr(*server),
                server_args(lb)
            );
        }
    }
}

/// Name of the server for a backend address: stable, so the runtime API
/// finds the server the configuration declared.
pub fn server_name(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => v6.to_string().replace(':', "_"),
    };
    format!("pod-{ip}-{}", addr.port())
}

/// An address as HAProxy reads it (the last colon separates the port, so
/// IPv6 needs no brackets).
pub fn addr(addr: SocketAddr) -> String {
    format!("{}:{}", addr.ip(), addr.port())
}

/// Server keywords, the same in the configuration and in `add server`
/// (dynamic servers do not inherit `default-server`).
pub fn server_args(lb: &LbState) -> String {
    let hc = &lb.spec.health_check;
    let mut args = format!(
        "check inter {} rise {} fall {}",
        millis(hc.interval),
        hc.healthy_threshold,
        hc.unhealthy_threshold
    );
    if let HealthCheckPort::Port(port) = hc.port {
        let _ = write!(args, " port {port}");
    }
    if hc.protocol == HealthCheckProtocol::Https {
        args.push_str(" check-ssl verify none");
    }
    if lb.proxy_protocol() {
        args.push_str(" send-proxy-v2");
    }
    args
}

fn millis(d: Duration) -> String {
    format!("{}ms", d.as_millis().max(1))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use cnlb_provider_core::{Listener, LoadBalancerKey, LoadBalancerSpec, Protocol};

    use super::super::state::{ATTR_PROXY_PROTOCOL_V2, AddressPool};
    use super::*;

    fn state() -> State {
        let mut spec = LoadBalancerSpec::new(LoadBalancerKey::new("c1", "default", "web", "uid-1"));
        spec.listeners = vec![Listener {
            name: "http".into(),
            protocol: Protocol::Tcp,
            port: 80,
            target_port: 8080,
        }];
        let pool: AddressPool = "127.0.0.0/24".parse().unwrap();
        let mut state = State::default().ensure(&spec, &pool).unwrap();
        let lb = state.load_balancers.values_mut().next().unwrap();
        lb.servers.insert(
            80,
            BTreeSet::from([
                "10.0.0.1:8080".parse().unwrap(),
                "10.0.0.2:8080".parse().unwrap(),
            ]),
        );
        state
    }

    #[test]
    fn renders_frontend_backend_and_servers() {
        let text = render(&state(), Path::new("/run/haproxy/admin.sock"));
        let name = "k8s-default-web-";
        assert!(text.contains("stats socket /run/haproxy/admin.sock mode 600 level admin"));
        assert!(text.contains(&format!("\nfrontend {name}")), "{text}");
        assert!(text.contains("    bind 127.0.0.1:80\n"), "{text}");
        assert!(text.contains("    balance roundrobin\n"));
        assert!(text.contains("    timeout check 10000ms\n"));
        assert!(text.contains(
            "    server pod-10.0.0.1-8080 10.0.0.1:8080 check inter 10000ms rise 3 fall 3\n"
        ));
        assert!(text.contains("    server pod-10.0.0.2-8080 10.0.0.2:8080 "));
        assert!(!text.contains("httpchk"));
        assert!(!text.contains("cnlb_allowed"));
        // Deterministic.
        assert_eq!(text, render(&state(), Path::new("/run/haproxy/admin.sock")));
    }

    #[test]
    fn renders_health_check_source_ranges_and_proxy_protocol() {
        let mut state = state();
        let lb = state.load_balancers.values_mut().next().unwrap();
        lb.spec.source_ranges = vec!["10.0.0.0/8".into(), "192.168.0.0/16".into()];
        lb.spec.health_check.protocol = HealthCheckProtocol::Http;
        lb.spec.health_check.path = Some("/healthz".into());
        lb.spec.health_check.port = HealthCheckPort::Port(9000);
        lb.spec
            .target_group_attributes
            .insert(ATTR_PROXY_PROTOCOL_V2.into(), "true".into());
        let text = render(&state, Path::new("/s"));
        assert!(text.contains("    acl cnlb_allowed src 10.0.0.0/8 192.168.0.0/16\n"));
        assert!(text.contains("    tcp-request connection reject unless cnlb_allowed\n"));
        assert!(text.contains("    option httpchk\n    http-check send meth GET uri /healthz\n"));
        assert!(text.contains("    http-check expect status 200-399\n"));
        assert!(text.contains(" port 9000 send-proxy-v2\n"), "{text}");
    }

    #[test]
    fn names_and_addresses() {
        let v6: SocketAddr = "[2001:db8::1]:8080".parse().unwrap();
        assert_eq!(server_name(v6), "pod-2001_db8__1-8080");
        assert_eq!(addr(v6), "2001:db8::1:8080");
        assert_eq!(
            server_name("10.1.2.3:80".parse().unwrap()),
            "pod-10.1.2.3-80"
        );
    }
}
