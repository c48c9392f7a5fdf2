//! Typed provider errors, so the controller can decide between "tell the user
//! and wait", "retry at a given time" and "retry with backoff" without parsing
//! cloud messages.

use std::time::Duration;

/// Result type of every provider call.
pub type Result<T, E = ProviderError> = std::result::Result<T, E>;

/// What went wrong in a provider call.
///
/// Providers map cloud SDK errors onto these variants; `Cloud` is the
/// fallback for everything that has no better home.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The desired state cannot be built as asked (bad annotation value,
    /// unsupported protocol, invalid CIDR...). A user error: report it as an
    /// Event/condition and do not retry until the object changes.
    #[error("invalid {field}: {reason}")]
    InvalidSpec { field: String, reason: String },

    /// The cloud asked to come back later, at a known time.
    #[error("retry after {0:?}")]
    RetryAfter(Duration),

    /// The cloud API rate-limited `operation`.
    #[error("throttled by the cloud API during {operation}")]
    Throttled { operation: String },

    /// An account/project quota or a hard limit was hit for `resource`.
    #[error("quota exceeded for {resource}")]
    QuotaExceeded { resource: String },

    /// A resource the call depends on does not exist (e.g. a subnet named in
    /// the spec). Missing resources the call itself manages are not errors:
    /// `ensure` recreates them and `delete` treats them as done.
    #[error("{resource} not found")]
    NotFound { resource: String },

    /// A concurrent change or a name clash with a resource that is not ours
    /// (e.g. a stale fingerprint, or a load balancer with our name carrying
    /// another owner's tags).
    #[error("conflict on {resource}: {reason}")]
    Conflict { resource: String, reason: String },

    /// Any other cloud failure. `retryable` says whether retrying the same
    /// request can succeed (5xx, timeouts) or not (access denied, rejected
    /// parameters).
    #[error("{operation} failed: {message}")]
    Cloud {
        operation: String,
        message: String,
        retryable: bool,
    },
}

/// How the controller should retry after an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryPolicy {
    /// Do not requeue; the next change of the object (or the periodic resync)
    /// triggers the next attempt.
    AwaitChange,
    /// Requeue after exactly this long.
    After(Duration),
    /// Requeue with the controller's capped exponential backoff.
    Backoff,
}

impl ProviderError {
    /// Shorthand for [`ProviderError::InvalidSpec`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidSpec {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`ProviderError::Cloud`].
    pub fn cloud(
        operation: impl Into<String>,
        message: impl Into<String>,
        retryable: bool,
    ) -> Self {
        Self::Cloud {
            operation: operation.into(),
            message: message.into(),
            retryable,
        }
    }

    /// How the controller should retry this error.
    pub fn retry_policy(&self) -> RetryPolicy {
        match self {
            Self::InvalidSpec { .. } => RetryPolicy::AwaitChange,
            Self::RetryAfter(delay) => RetryPolicy::After(*delay),
            // Quota can be raised and conflicts resolve themselves or by an
            // operator outside the object, so keep trying, slowly.
            Self::Throttled { .. }
            | Self::QuotaExceeded { .. }
            | Self::NotFound { .. }
            | Self::Conflict { .. } => RetryPolicy::Backoff,
            Self::Cloud {
                retryable: true, ..
            } => RetryPolicy::Backoff,
            Self::Cloud {
                retryable: false, ..
            } => RetryPolicy::AwaitChange,
        }
    }

    /// True for errors the user must fix in the object.
    pub fn is_user_error(&self) -> bool {
        matches!(self, Self::InvalidSpec { .. })
    }

    /// Stable, low-cardinality label for metrics (`error="..."`).
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::InvalidSpec { .. } => "invalid_spec",
            Self::RetryAfter(_) => "retry_after",
            Self::Throttled { .. } => "throttled",
            Self::QuotaExceeded { .. } => "quota_exceeded",
            Self::NotFound { .. } => "not_found",
            Self::Conflict { .. } => "conflict",
            Self::Cloud { .. } => "cloud",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_policy_mapping() {
        let cases = [
            (
                ProviderError::invalid("listeners", "empty"),
                RetryPolicy::AwaitChange,
            ),
            (
                ProviderError::RetryAfter(Duration::from_secs(7)),
                RetryPolicy::After(Duration::from_secs(7)),
            ),
            (
                ProviderError::Throttled {
                    operation: "RegisterTargets".into(),
                },
                RetryPolicy::Backoff,
            ),
            (
                ProviderError::QuotaExceeded {
                    resource: "load balancers".into(),
                },
                RetryPolicy::Backoff,
            ),
            (
                ProviderError::NotFound {
                    resource: "subnet-1".into(),
                },
                RetryPolicy::Backoff,
            ),
            (
                ProviderError::Conflict {
                    resource: "neg".into(),
                    reason: "fingerprint".into(),
                },
                RetryPolicy::Backoff,
            ),
            (
                ProviderError::cloud("CreateLoadBalancer", "500", true),
                RetryPolicy::Backoff,
            ),
            (
                ProviderError::cloud("CreateLoadBalancer", "AccessDenied", false),
                RetryPolicy::AwaitChange,
            ),
        ];
        for (err, policy) in cases {
            assert_eq!(err.retry_policy(), policy, "{err}");
        }
    }

    #[test]
    fn metric_labels_and_messages() {
        let err = ProviderError::invalid("source_ranges[0]", "not a CIDR: x");
        assert_eq!(err.metric_label(), "invalid_spec");
        assert!(err.is_user_error());
        assert_eq!(err.to_string(), "invalid source_ranges[0]: not a CIDR: x");
        let err = ProviderError::cloud("DeleteLoadBalancer", "boom", true);
        assert_eq!(err.metric_label(), "cloud");
        assert!(!err.is_user_error());
        assert_eq!(err.to_string(), "DeleteLoadBalancer failed: boom");
    }
}
