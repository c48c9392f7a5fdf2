//! Which cloud operation a request is, as the proxy's rules and records name
//! it: `ec2:DescribeInstances`, `elbv2:RegisterTargets` (AWS query protocol:
//! the service from the SigV4 credential scope, the action from the form
//! body), `networkEndpointGroups.attachNetworkEndpoints` (GCE REST: the
//! collection and the method, the verb when there is no custom method).

use http::Method;

/// The AWS operation of a query-protocol request: `service:Action`.
pub fn aws(authorization: Option<&str>, body: &[u8]) -> String {
    let service = authorization
        .and_then(|auth| auth.split("Credential=").nth(1))
        .and_then(|credential| credential.split('/').nth(3))
        .map(|scope| match scope {
            "elasticloadbalancing" => "elbv2",
            other => other,
        })
        .unwrap_or("unknown");
    let action = String::from_utf8_lossy(body)
        .split('&')
        .find_map(|pair| pair.strip_prefix("Action="))
        .unwrap_or("Unknown")
        .to_string();
    format!("{service}:{action}")
}

/// Whether an AWS describe names a filter or pagination (EC2 then draws
/// from the larger bucket).
pub fn aws_filtered(body: &[u8]) -> bool {
    String::from_utf8_lossy(body).split('&').any(|pair| {
        pair.starts_with("Filter.")
            || pair.starts_with("MaxResults=")
            || pair.starts_with("NextToken=")
    })
}

/// The GCE operation of a `/compute/v1/projects/P/...` request.
pub fn gce(method: &Method, path: &str) -> String {
    let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    // Past `projects/P` and the scope (`global`, `regions/R`, `zones/Z`).
    let mut rest = match segments.iter().position(|s| *s == "projects") {
        Some(i) => &segments[(i + 2).min(segments.len())..],
        None => &segments[..],
    };
    match rest.first() {
        Some(&"global") => rest = &rest[1..],
        Some(&"regions" | &"zones") if rest.len() > 2 => rest = &rest[2..],
        _ => {}
    }
    let Some(collection) = rest.first() else {
        return format!("{method} {path}");
    };
    let verb = match (rest.len(), method.as_str()) {
        (1, "GET") => "list",
        (1, "POST") => "insert",
        (2, "GET") => "get",
        (2, "DELETE") => "delete",
        (2, "PATCH") => "patch",
        (2, "PUT") => "update",
        (_, _) => rest.get(2).copied().unwrap_or("unknown"),
    };
    format!("{collection}.{verb}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_operations() {
        let auth = "AWS4-HMAC-SHA256 Credential=test/20261207/us-east-1/elasticloadbalancing/aws4_request, SignedHeaders=host, Signature=x";
        assert_eq!(
            aws(Some(auth), b"Action=RegisterTargets&Version=2015-12-01"),
            "elbv2:RegisterTargets"
        );
        let auth = "AWS4-HMAC-SHA256 Credential=test/20261207/us-east-1/ec2/aws4_request";
        assert_eq!(
            aws(Some(auth), b"Version=2016-11-15&Action=DescribeInstances"),
            "ec2:DescribeInstances"
        );
        assert_eq!(aws(None, b""), "unknown:Unknown");
    }

    #[test]
    fn gce_operations() {
        let p = "/compute/v1/projects/p";
        let cases = [
            (
                Method::GET,
                format!("{p}/zones/z/networkEndpointGroups"),
                "networkEndpointGroups.list",
            ),
            (
                Method::POST,
                format!("{p}/zones/z/networkEndpointGroups"),
                "networkEndpointGroups.insert",
            ),
            (
                Method::POST,
                format!("{p}/zones/z/networkEndpointGroups/n/attachNetworkEndpoints"),
                "networkEndpointGroups.attachNetworkEndpoints",
            ),
            (
                Method::DELETE,
                format!("{p}/global/backendServices/b"),
                "backendServices.delete",
            ),
            (
                Method::PATCH,
                format!("{p}/global/backendServices/b"),
                "backendServices.patch",
            ),
            (
                Method::GET,
                format!("{p}/regions/r/operations/op-1"),
                "operations.get",
            ),
            (
                Method::POST,
                format!("{p}/zones/z/operations/op-1/wait"),
                "operations.wait",
            ),
            (
                Method::GET,
                format!("{p}/zones/z/instances"),
                "instances.list",
            ),
            (Method::GET, format!("{p}/regions/r"), "regions.get"),
        ];
        for (method, path, want) in cases {
            assert_eq!(gce(&method, &path), want, "{method} {path}");
        }
    }
}
