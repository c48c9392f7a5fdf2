//! Region health checks: their types, checks and defaults, and what a
//! stored health check probes.

use serde_json::{Value, json};

use super::Result;
use super::health::Probe;
use super::resources::set_default;
use crate::error::ApiError;

/// Defaults of a health check: intervals, thresholds and its type's
/// port, port specification, proxy header and request path.
pub(super) fn finish_health_check(v: &mut Value) -> Result<()> {
    let ty = health_check_type(v)?;
    v["type"] = json!(ty);
    set_default(v, "checkIntervalSec", json!(5));
    set_default(v, "timeoutSec", json!(5));
    set_default(v, "healthyThreshold", json!(2));
    set_default(v, "unhealthyThreshold", json!(2));
    let field = health_check_field(ty);
    set_default(v, field, json!({}));
    let sub = &mut v[field];
    let serving = sub.get("portSpecification").and_then(Value::as_str) == Some("USE_SERVING_PORT");
    if !serving {
        set_default(sub, "port", json!(default_port(ty)));
        set_default(sub, "portSpecification", json!("USE_FIXED_PORT"));
    }
    set_default(sub, "proxyHeader", json!("NONE"));
    if matches!(ty, "HTTP" | "HTTPS" | "HTTP2") {
        set_default(sub, "requestPath", json!("/"));
    }
    Ok(())
}

fn health_check_type(v: &Value) -> Result<&'static str> {
    const TYPES: [(&str, &str); 7] = [
        ("TCP", "tcpHealthCheck"),
        ("HTTP", "httpHealthCheck"),
        ("HTTPS", "httpsHealthCheck"),
        ("HTTP2", "http2HealthCheck"),
        ("SSL", "sslHealthCheck"),
        ("GRPC", "grpcHealthCheck"),
        ("GRPC_WITH_TLS", "grpcTlsHealthCheck"),
    ];
    match v.get("type").and_then(Value::as_str) {
        Some(t) => TYPES
            .iter()
            .find(|(n, _)| *n == t)
            .map(|(n, _)| *n)
            .ok_or_else(|| {
                ApiError::invalid_field("resource.type", t, "Unknown health check type.")
            }),
        None => TYPES
            .iter()
            .find(|(_, f)| v.get(*f).is_some())
            .map(|(n, _)| *n)
            .ok_or_else(|| ApiError::required("resource.type")),
    }
}

fn health_check_field(ty: &str) -> &'static str {
    match ty {
        "HTTP" => "httpHealthCheck",
        "HTTPS" => "httpsHealthCheck",
        "HTTP2" => "http2HealthCheck",
        "SSL" => "sslHealthCheck",
        "GRPC" => "grpcHealthCheck",
        "GRPC_WITH_TLS" => "grpcTlsHealthCheck",
        _ => "tcpHealthCheck",
    }
}

fn default_port(ty: &str) -> u16 {
    match ty {
        "HTTPS" | "HTTP2" | "SSL" => 443,
        _ => 80,
    }
}

pub(super) fn check_health_check(v: &Value) -> Result<()> {
    let ty = health_check_type(v)?;
    let field = health_check_field(ty);
    for other in [
        "tcpHealthCheck",
        "httpHealthCheck",
        "httpsHealthCheck",
        "http2HealthCheck",
        "sslHealthCheck",
        "grpcHealthCheck",
        "grpcTlsHealthCheck",
    ] {
        if other != field && v.get(other).is_some() {
            return Err(ApiError::invalid_field(
                &format!("resource.{other}"),
                "",
                &format!("A health check of type {ty} takes only {field}."),
            ));
        }
    }
    let num = |k: &str| v.get(k).and_then(Value::as_i64);
    for (k, lo, hi) in [
        ("checkIntervalSec", 1, 300),
        ("timeoutSec", 1, 300),
        ("healthyThreshold", 1, 10),
        ("unhealthyThreshold", 1, 10),
    ] {
        if let Some(n) = num(k)
            && !(lo..=hi).contains(&n)
        {
            return Err(ApiError::invalid_field(
                &format!("resource.{k}"),
                &n.to_string(),
                &format!("Must be between {lo} and {hi}."),
            ));
        }
    }
    if num("timeoutSec").unwrap_or(5) > num("checkIntervalSec").unwrap_or(5) {
        return Err(ApiError::invalid(
            "Invalid value for field 'resource.timeoutSec': timeout must be less than or equal to checkIntervalSec.",
        ));
    }
    if let Some(sub) = v.get(field) {
        let spec = sub.get("portSpecification").and_then(Value::as_str);
        let port = sub.get("port").and_then(Value::as_i64);
        if spec == Some("USE_SERVING_PORT") && port.is_some() {
            return Err(ApiError::invalid_field(
                &format!("resource.{field}.port"),
                &port.unwrap_or(0).to_string(),
                "A port must not be given with portSpecification USE_SERVING_PORT.",
            ));
        }
        if let Some(p) = port
            && !(1..=65535).contains(&p)
        {
            return Err(ApiError::invalid_field(
                &format!("resource.{field}.port"),
                &p.to_string(),
                "Must be between 1 and 65535.",
            ));
        }
    }
    Ok(())
}

/// What to probe for a stored health check, and the fixed port (None: the
/// endpoint's own port, `USE_SERVING_PORT`). Types other than TCP and HTTP
/// are probed by a TCP connect.
pub(super) fn probe_of(hc: &Value) -> Option<(Probe, Option<u16>)> {
    let ty = health_check_type(hc).ok()?;
    let sub = hc.get(health_check_field(ty)).cloned().unwrap_or(json!({}));
    let s = |k: &str| sub.get(k).and_then(Value::as_str).map(str::to_string);
    let fixed = match s("portSpecification").as_deref() {
        Some("USE_SERVING_PORT") | Some("USE_NAMED_PORT") => None,
        _ => Some(
            sub.get("port")
                .and_then(Value::as_u64)
                .and_then(|p| u16::try_from(p).ok())
                .unwrap_or(default_port(ty)),
        ),
    };
    let probe = match ty {
        "HTTP" => Probe::Http {
            path: s("requestPath").unwrap_or_else(|| "/".into()),
            host: s("host"),
            response: s("response"),
        },
        "TCP" => Probe::Tcp {
            request: s("request"),
            response: s("response"),
        },
        _ => Probe::Tcp {
            request: None,
            response: None,
        },
    };
    Some((probe, fixed))
}
