//! The error answers the real clouds give, byte for byte in the fields the
//! SDKs read (status, error code, reason), so the product's own error
//! classification is what gets tested.

use http::StatusCode;

/// What the proxy answers instead of the emulator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Injected {
    Throttle,
    ServerError,
    Unavailable,
}

/// Status, content type and body of an injected error. `service` is the
/// operation's prefix (`ec2`, `elbv2`) on AWS, `None` on GCE; `alternate`
/// picks GCE's second throttle shape (403 `userRateLimitExceeded`).
pub fn answer(
    service: Option<&str>,
    injected: Injected,
    alternate: bool,
) -> (StatusCode, &'static str, String) {
    match service {
        Some("elbv2") => {
            let (status, kind, code, message) = match injected {
                Injected::Throttle => (400, "Sender", "Throttling", "Rate exceeded"),
                Injected::ServerError => (500, "Receiver", "InternalFailure", "Internal failure"),
                Injected::Unavailable => {
                    (503, "Receiver", "ServiceUnavailable", "Service unavailable")
                }
            };
            let body = format!(
                r#"<ErrorResponse xmlns="http://elasticloadbalancing.amazonaws.com/doc/2015-12-01/"><Error><Type>{kind}</Type><Code>{code}</Code><Message>{message}</Message></Error><RequestId>{}</RequestId></ErrorResponse>"#,
                uuid()
            );
            (status_code(status), "text/xml", body)
        }
        Some(_) => {
            // EC2 answers throttling with 503 RequestLimitExceeded.
            let (status, code, message) = match injected {
                Injected::Throttle => (503, "RequestLimitExceeded", "Request limit exceeded."),
                Injected::ServerError => (500, "InternalError", "An internal error has occurred"),
                Injected::Unavailable => (503, "Unavailable", "The server is overloaded"),
            };
            let body = format!(
                r#"<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error><Code>{code}</Code><Message>{message}</Message></Error></Errors><RequestID>{}</RequestID></Response>"#,
                uuid()
            );
            (status_code(status), "text/xml", body)
        }
        None => {
            let (code, status, domain, reason, message) = match (injected, alternate) {
                (Injected::Throttle, false) => (
                    429,
                    "RESOURCE_EXHAUSTED",
                    "usageLimits",
                    "rateLimitExceeded",
                    "Rate Limit Exceeded",
                ),
                (Injected::Throttle, true) => (
                    403,
                    "PERMISSION_DENIED",
                    "usageLimits",
                    "userRateLimitExceeded",
                    "User Rate Limit Exceeded",
                ),
                (Injected::ServerError, _) => {
                    (500, "INTERNAL", "global", "backendError", "Internal error")
                }
                (Injected::Unavailable, _) => (
                    503,
                    "UNAVAILABLE",
                    "global",
                    "backendError",
                    "The service is currently unavailable.",
                ),
            };
            let body = serde_json::json!({"error": {
                "code": code,
                "message": message,
                "errors": [{"message": message, "domain": domain, "reason": reason}],
                "status": status,
            }})
            .to_string();
            (status_code(code), "application/json", body)
        }
    }
}

fn status_code(code: u16) -> StatusCode {
    StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn uuid() -> String {
    uuid_like(fastrand::u128(..))
}

fn uuid_like(n: u128) -> String {
    let hex = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        let (status, _, body) = answer(Some("ec2"), Injected::Throttle, false);
        assert_eq!(status, 503);
        assert!(body.contains("<Code>RequestLimitExceeded</Code>"), "{body}");
        let (status, _, body) = answer(Some("elbv2"), Injected::Throttle, false);
        assert_eq!(status, 400);
        assert!(body.contains("<Code>Throttling</Code>"), "{body}");
        let (status, _, body) = answer(None, Injected::Throttle, true);
        assert_eq!(status, 403);
        assert!(body.contains("userRateLimitExceeded"), "{body}");
        let (status, _, body) = answer(None, Injected::Unavailable, false);
        assert_eq!(status, 503);
        assert!(body.contains("backendError"), "{body}");
        assert_eq!(uuid_like(0).len(), 36);
    }
}
