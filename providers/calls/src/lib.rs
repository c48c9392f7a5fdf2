//! The one way a provider calls its cloud: [`Calls::run`] wraps every
//! request with
//!
//! - a client-side rate per [`Group`] of operations, waited on before each
//!   attempt, so a burst of reconciles slows down here instead of being
//!   throttled by the cloud (whose quotas are per account or project,
//!   shared with every other tool). The rate adapts ([`adaptive`]): it
//!   starts at the group's ceiling ([`RateLimits`]), halves when the cloud
//!   throttles and climbs back while calls go through;
//! - a throttled request is sent again when the slowed bucket allows, up
//!   to [`MAX_THROTTLED`] times, and does not count as a failed attempt;
//! - retries with exponential backoff and jitter (backon) on retryable
//!   cloud errors (5xx, timeouts, connection failures), bounded to
//!   [`MAX_ATTEMPTS`]; user errors, `NotFound` and `Conflict` are returned
//!   at once, for the caller (and the controller) to decide;
//! - metrics per operation, one observation per attempt (each request the
//!   cloud sees): `cnlb_cloud_api_calls_total`, `cnlb_cloud_api_errors_total`
//!   (by [`ProviderError::metric_label`]), `cnlb_cloud_api_throttles_total`
//!   and `cnlb_cloud_api_duration_seconds`, all labelled
//!   `provider="<provider>",operation="<API method>"`, and the current rate
//!   per group, `cnlb_cloud_api_rate{provider,group}` (calls per second).
//!
//! The SDKs' own retries are to be turned off, so that this is the only
//! retry layer. Which group an operation belongs to is the provider's to say.

pub mod adaptive;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use cnlb_provider_core::{ProviderError, Result};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// Attempts of one logical call, the first included (throttled requests
/// do not count).
pub const MAX_ATTEMPTS: usize = 5;
/// Throttled requests of one attempt before the throttle is returned. Each
/// waits for the slowed bucket, so this is at least about a minute of
/// throttling (at [`adaptive::FLOOR`], two seconds each).
pub const MAX_THROTTLED: usize = 30;
/// Backoff before the first retry; it doubles per retry up to
/// [`RETRY_MAX_DELAY`], and jitter adds up to as much again at random so
/// that replicas and concurrent reconciles do not retry in step. With
/// [`MAX_ATTEMPTS`] = 5 the waits are about 0.2, 0.4, 0.8, 1.6 s (each up
/// to twice that): a call gives up after 3 to 6 s of backoff.
pub const RETRY_MIN_DELAY: Duration = Duration::from_millis(200);
pub const RETRY_MAX_DELAY: Duration = Duration::from_secs(10);

/// Upper bounds of the latency histogram buckets, in seconds: 5 ms to 30 s.
const DURATION_BUCKETS: [f64; 12] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// A token bucket: `per_second` tokens refill each second, up to `burst`.
/// Zero is taken as one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

impl RateLimit {
    pub const fn new(per_second: u32, burst: u32) -> RateLimit {
        RateLimit { per_second, burst }
    }
}

/// `RATE/BURST`, both positive integers, e.g. `10/20` (the form of the
/// `--aws-*-rate` and `--gcp-*-rate` flags).
impl std::str::FromStr for RateLimit {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<RateLimit, String> {
        let parse = |v: &str| v.trim().parse::<u32>().ok().filter(|n| *n > 0);
        match s.split_once('/') {
            Some((rate, burst)) => match (parse(rate), parse(burst)) {
                (Some(rate), Some(burst)) => Ok(RateLimit::new(rate, burst)),
                _ => Err(format!(
                    "{s:?}: expected RATE/BURST with positive integers, like 10/20"
                )),
            },
            None => Err(format!("{s:?}: expected RATE/BURST, like 10/20")),
        }
    }
}

/// The ceilings of the client-side rates per [`Group`] of operations,
/// shared by every reconcile of this process. Clouds throttle per account
/// (AWS, per API and Region) or per project (GCP, per minute and method
/// group) with buckets shared by every caller (console, CLI, Terraform,
/// other controllers), so the rate in use adapts below these
/// ([`adaptive`]); they start as fast as aws-load-balancer-controller's
/// defaults, or faster:
///
/// | group | operations | default |
/// | --- | --- | --- |
/// | `read` | describe, get, list | 20/s, burst 40 |
/// | `targets` | register / deregister targets, attach / detach endpoints | 10/s, burst 20 |
/// | `write` | create, modify, delete, tag | 10/s, burst 20 |
/// | `operations` | waits for a long-running operation (GCP) | 24/s, burst 24 |
///
/// Target changes are batched (hundreds of targets a call), so 10 calls a
/// second is thousands of target changes a second. GCE counts operation
/// reads on a quota of their own (1,500 a minute), one or more per
/// mutation; AWS has no such calls.
///
/// `per_window`, when set, also bounds each group's calls in any window
/// of time (GCE's per-minute quotas); none by default.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateLimits {
    pub read: RateLimit,
    pub targets: RateLimit,
    pub write: RateLimit,
    pub operations: RateLimit,
    pub per_window: Option<adaptive::Window>,
}

impl Default for RateLimits {
    fn default() -> Self {
        RateLimits {
            read: RateLimit::new(20, 40),
            targets: RateLimit::new(10, 20),
            write: RateLimit::new(10, 20),
            operations: RateLimit::new(24, 24),
            per_window: None,
        }
    }
}

/// Which bucket of [`RateLimits`] an operation draws from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Group {
    Read,
    Targets,
    Write,
    Operations,
}

impl Group {
    fn label(self) -> &'static str {
        match self {
            Group::Read => "read",
            Group::Targets => "targets",
            Group::Write => "write",
            Group::Operations => "operations",
        }
    }
}

/// One group's adaptive bucket, and the gauge that shows its rate.
struct Limiter {
    bucket: Mutex<adaptive::Bucket>,
    rate: Gauge<f64, AtomicU64>,
}

impl Limiter {
    fn new(
        limit: RateLimit,
        window: Option<adaptive::Window>,
        rate: Gauge<f64, AtomicU64>,
    ) -> Limiter {
        let bucket = adaptive::Bucket::new(limit, window, Instant::now());
        rate.set(bucket.rate());
        Limiter {
            bucket: Mutex::new(bucket),
            rate,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut adaptive::Bucket) -> T) -> T {
        // The bucket stays consistent whatever a panicking holder did.
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        let out = f(&mut bucket);
        self.rate.set(bucket.rate());
        out
    }

    /// Returns once a token is taken.
    async fn wait(&self) {
        while let Err(wait) = self.with(|b| b.take(Instant::now())) {
            tokio::time::sleep(wait).await;
        }
    }

    fn throttled(&self) {
        self.with(|b| b.throttled(Instant::now()));
    }

    fn answered(&self) {
        self.with(|b| b.answered(Instant::now()));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OperationLabels {
    provider: &'static str,
    operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    provider: &'static str,
    group: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ErrorLabels {
    provider: &'static str,
    operation: &'static str,
    kind: &'static str,
}

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

struct Metrics {
    calls: Family<OperationLabels, Counter>,
    errors: Family<ErrorLabels, Counter>,
    throttles: Family<OperationLabels, Counter>,
    duration: Family<OperationLabels, Histogram, fn() -> Histogram>,
    rate: Family<GroupLabels, Gauge<f64, AtomicU64>>,
}

impl Metrics {
    fn register(registry: &mut Registry) -> Metrics {
        let metrics = Metrics {
            calls: Family::default(),
            errors: Family::default(),
            throttles: Family::default(),
            duration: Family::new_with_constructor(duration_histogram),
            rate: Family::default(),
        };
        registry.register(
            "cnlb_cloud_api_calls",
            "Requests sent to the cloud API, retries included",
            metrics.calls.clone(),
        );
        registry.register(
            "cnlb_cloud_api_errors",
            "Cloud API requests that failed, by kind of error",
            metrics.errors.clone(),
        );
        registry.register(
            "cnlb_cloud_api_throttles",
            "Cloud API requests rejected by the cloud's rate limits",
            metrics.throttles.clone(),
        );
        registry.register_with_unit(
            "cnlb_cloud_api_duration",
            "Latency of cloud API requests, each attempt on its own",
            Unit::Seconds,
            metrics.duration.clone(),
        );
        registry.register(
            "cnlb_cloud_api_rate",
            "Calls per second the client allows itself now, per group of operations: \
             the ceiling until the cloud throttles, then found by adapting",
            metrics.rate.clone(),
        );
        metrics
    }

    fn rate(&self, provider: &'static str, group: Group) -> Gauge<f64, AtomicU64> {
        self.rate
            .get_or_create(&GroupLabels {
                provider,
                group: group.label(),
            })
            .clone()
    }

    fn observe(
        &self,
        provider: &'static str,
        operation: &'static str,
        elapsed: Duration,
        error: Option<&ProviderError>,
    ) {
        let labels = OperationLabels {
            provider,
            operation,
        };
        self.calls.get_or_create(&labels).inc();
        self.duration
            .get_or_create(&labels)
            .observe(elapsed.as_secs_f64());
        if let Some(err) = error {
            self.errors
                .get_or_create(&ErrorLabels {
                    provider,
                    operation,
                    kind: err.metric_label(),
                })
                .inc();
            if matches!(err, ProviderError::Throttled { .. }) {
                self.throttles.get_or_create(&labels).inc();
            }
        }
    }
}

/// Worth sending the same request again after a backoff (a throttled one
/// is sent again by [`Calls::attempt`], paced by its bucket).
fn is_retryable(err: &ProviderError) -> bool {
    matches!(
        err,
        ProviderError::Cloud {
            retryable: true,
            ..
        }
    )
}

/// Rate limits, retries and metrics of every call of one provider; see the
/// module docs.
pub struct Calls {
    provider: &'static str,
    group_of: fn(&str) -> Group,
    read: Limiter,
    targets: Limiter,
    write: Limiter,
    operations: Limiter,
    backoff: ExponentialBuilder,
    metrics: Metrics,
}

impl Calls {
    /// Calls of `provider` (the metrics' `provider` label), whose
    /// operations `group_of` sorts into rate limit groups. Registers the
    /// `cnlb_cloud_api_*` metrics in `registry`.
    pub fn new(
        provider: &'static str,
        group_of: fn(&str) -> Group,
        limits: &RateLimits,
        registry: &mut Registry,
    ) -> Calls {
        let metrics = Metrics::register(registry);
        let limiter =
            |limit, group| Limiter::new(limit, limits.per_window, metrics.rate(provider, group));
        Calls {
            provider,
            group_of,
            read: limiter(limits.read, Group::Read),
            targets: limiter(limits.targets, Group::Targets),
            write: limiter(limits.write, Group::Write),
            operations: limiter(limits.operations, Group::Operations),
            backoff: ExponentialBuilder::default()
                .with_min_delay(RETRY_MIN_DELAY)
                .with_max_delay(RETRY_MAX_DELAY)
                .with_max_times(MAX_ATTEMPTS - 1)
                .with_jitter(),
            metrics,
        }
    }

    /// Runs `call` (which builds and sends one request and maps its error
    /// to a [`ProviderError`]) as the API method `operation`: waits for a
    /// token of its group, sends it again when throttled (slowing the
    /// group) and after retryable errors, and records each request in the
    /// metrics.
    pub async fn run<T, F, Fut>(&self, operation: &'static str, call: F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        (|| self.attempt(operation, &call))
            .retry(self.backoff)
            .when(is_retryable)
            .notify(|err, delay| {
                tracing::debug!(provider = self.provider, operation, error = %err, retry_in = ?delay, "retrying cloud call");
            })
            .await
    }

    /// [`Calls::run`] for a request that must not be repeated blindly: a
    /// create without an idempotency token, or a change the cloud refuses
    /// to make twice (a rule that exists). Throttling is retried as usual
    /// (the cloud did nothing), but after any other retryable failure the
    /// outcome is unknown (the answer may be what was lost), so `recover`
    /// runs before the next attempt: it looks for what the request would
    /// have done and returns it, or `None` to send the request again.
    pub async fn run_unrepeatable<T, F, Fut, R, RFut>(
        &self,
        operation: &'static str,
        call: F,
        recover: R,
    ) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
        R: Fn() -> RFut,
        RFut: Future<Output = Result<Option<T>>>,
    {
        let unknown = std::sync::atomic::AtomicBool::new(false);
        (|| async {
            if unknown.load(std::sync::atomic::Ordering::Relaxed)
                && let Some(done) = recover().await?
            {
                tracing::debug!(provider = self.provider, operation, "an earlier attempt had done it");
                return Ok(done);
            }
            let result = self.attempt(operation, &call).await;
            let lost = matches!(&result, Err(e) if is_retryable(e));
            unknown.store(lost, std::sync::atomic::Ordering::Relaxed);
            result
        })
        .retry(self.backoff)
        .when(is_retryable)
        .notify(|err, delay| {
            tracing::debug!(provider = self.provider, operation, error = %err, retry_in = ?delay, "retrying cloud call");
        })
        .await
    }

    /// One attempt: the request, sent again while the cloud throttles it
    /// (each time the group's rate is cut and the next token waited for),
    /// up to [`MAX_THROTTLED`] times.
    async fn attempt<T, F, Fut>(&self, operation: &'static str, call: &F) -> Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let limiter = self.limiter(operation);
        let mut throttled = 0;
        loop {
            limiter.wait().await;
            let started = tokio::time::Instant::now();
            let result = call().await;
            self.metrics.observe(
                self.provider,
                operation,
                started.elapsed(),
                result.as_ref().err(),
            );
            if !matches!(result, Err(ProviderError::Throttled { .. })) {
                limiter.answered();
                return result;
            }
            limiter.throttled();
            throttled += 1;
            if throttled >= MAX_THROTTLED {
                return result;
            }
            tracing::debug!(
                provider = self.provider,
                operation,
                throttled,
                "throttled: sending again when the slowed bucket allows"
            );
        }
    }

    fn limiter(&self, operation: &str) -> &Limiter {
        match (self.group_of)(operation) {
            Group::Read => &self.read,
            Group::Targets => &self.targets,
            Group::Write => &self.write,
            Group::Operations => &self.operations,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Instant;

    use prometheus_client::encoding::text::encode;

    use super::*;

    /// Backoff short enough for real-time tests.
    fn calls(limits: RateLimits, registry: &mut Registry) -> Calls {
        let mut calls = Calls::new("aws", group_of, &limits, registry);
        calls.backoff = calls
            .backoff
            .with_min_delay(Duration::from_millis(1))
            .with_max_delay(Duration::from_millis(5));
        calls
    }

    /// The AWS provider's grouping, for these tests.
    fn group_of(operation: &str) -> Group {
        if operation.starts_with("Describe") {
            Group::Read
        } else if operation.ends_with("Targets") {
            Group::Targets
        } else {
            Group::Write
        }
    }

    fn unlimited() -> RateLimits {
        let many = RateLimit::new(10_000, 10_000);
        RateLimits {
            read: many,
            targets: many,
            write: many,
            operations: many,
            per_window: None,
        }
    }

    fn text(registry: &Registry) -> String {
        let mut out = String::new();
        encode(&mut out, registry).unwrap();
        out
    }

    fn throttled() -> ProviderError {
        ProviderError::Throttled {
            operation: "DescribeTags".into(),
        }
    }

    #[tokio::test]
    async fn an_unrepeatable_call_looks_before_it_sends_again() {
        let mut registry = Registry::default();
        let calls = calls(unlimited(), &mut registry);
        // Throttled, then an answer lost after the cloud made it (1), which
        // the look-up finds: no third request.
        let (attempts, lookups) = (AtomicUsize::new(0), AtomicUsize::new(0));
        let made = AtomicUsize::new(0);
        let out = calls
            .run_unrepeatable(
                "CreateLoadBalancer",
                || async {
                    match attempts.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(throttled()),
                        _ => {
                            made.store(1, Ordering::SeqCst);
                            Err(ProviderError::cloud("CreateLoadBalancer", "reset", true))
                        }
                    }
                },
                || async {
                    lookups.fetch_add(1, Ordering::SeqCst);
                    Ok(Some(made.load(Ordering::SeqCst)).filter(|n| *n > 0))
                },
            )
            .await;
        assert_eq!(out, Ok(1));
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert_eq!(
            lookups.load(Ordering::SeqCst),
            1,
            "no look-up after a throttle"
        );

        // Nothing found: the request is sent again.
        attempts.store(0, Ordering::SeqCst);
        let out = calls
            .run_unrepeatable(
                "CreateLoadBalancer",
                || async {
                    match attempts.fetch_add(1, Ordering::SeqCst) {
                        0 => Err(ProviderError::cloud("CreateLoadBalancer", "503", true)),
                        n => Ok(n + 10),
                    }
                },
                || async { Ok(None) },
            )
            .await;
        assert_eq!(out, Ok(11));
    }

    #[tokio::test]
    async fn retries_5xx_but_gives_up_after_max_attempts() {
        let mut registry = Registry::default();
        let calls = calls(unlimited(), &mut registry);
        let attempts = AtomicUsize::new(0);
        let out: Result<()> = calls
            .run("CreateLoadBalancer", || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(ProviderError::cloud("CreateLoadBalancer", "500", true))
            })
            .await;
        assert!(matches!(out, Err(ProviderError::Cloud { .. })), "{out:?}");
        assert_eq!(attempts.load(Ordering::SeqCst), MAX_ATTEMPTS);
        let text = text(&registry);
        let line = format!(
            r#"cnlb_cloud_api_errors_total{{provider="aws",operation="CreateLoadBalancer",kind="cloud"}} {MAX_ATTEMPTS}"#
        );
        assert!(text.contains(&line), "no {line} in\n{text}");
        assert!(!text.contains("cnlb_cloud_api_throttles_total{"), "{text}");
    }

    #[tokio::test]
    async fn does_not_retry_user_errors_not_found_or_conflicts() {
        let mut registry = Registry::default();
        let calls = calls(unlimited(), &mut registry);
        let errors = [
            ProviderError::invalid("targets", "InvalidTarget"),
            ProviderError::NotFound {
                resource: "tg".into(),
            },
            ProviderError::Conflict {
                resource: "tg".into(),
                reason: "ResourceInUse".into(),
            },
            ProviderError::cloud("DeregisterTargets", "AccessDenied", false),
        ];
        for err in errors {
            let attempts = AtomicUsize::new(0);
            let out: Result<()> = calls
                .run("DeregisterTargets", || async {
                    attempts.fetch_add(1, Ordering::SeqCst);
                    Err(err.clone())
                })
                .await;
            assert_eq!(out, Err(err.clone()));
            assert_eq!(attempts.load(Ordering::SeqCst), 1, "{err}");
        }
        let text = text(&registry);
        let labels = r#"provider="aws",operation="DeregisterTargets""#;
        for line in [
            format!("cnlb_cloud_api_calls_total{{{labels}}} 4"),
            format!(r#"cnlb_cloud_api_errors_total{{{labels},kind="invalid_spec"}} 1"#),
            format!(r#"cnlb_cloud_api_errors_total{{{labels},kind="not_found"}} 1"#),
            format!(r#"cnlb_cloud_api_errors_total{{{labels},kind="conflict"}} 1"#),
            format!(r#"cnlb_cloud_api_errors_total{{{labels},kind="cloud"}} 1"#),
        ] {
            assert!(text.contains(&line), "no {line} in\n{text}");
        }
    }

    /// With burst 3 at 10/s, three calls pass at once and the fourth waits
    /// for the next token, 100 ms after the first; other groups are not
    /// held up meanwhile. Real time (tokio's paused clock needs its
    /// test-util feature, which would make every crate depending on tokio
    /// build twice); the bounds leave room for a busy machine.
    #[tokio::test]
    async fn the_call_past_the_burst_waits_for_a_token() {
        let mut registry = Registry::default();
        let limits = RateLimits {
            write: RateLimit::new(10, 3),
            ..unlimited()
        };
        let calls = calls(limits, &mut registry);
        let ok = || async { Ok::<_, ProviderError>(()) };

        let start = Instant::now();
        for _ in 0..3 {
            calls.run("ModifyListener", ok).await.unwrap();
        }
        let burst = start.elapsed();
        let other = Instant::now();
        calls.run("DescribeListeners", ok).await.unwrap();
        let other = other.elapsed();
        calls.run("CreateListener", ok).await.unwrap();
        let past_burst = start.elapsed();

        // Without the burst, the three would take 200 ms.
        assert!(burst < Duration::from_millis(80), "{burst:?}");
        assert!(other < Duration::from_millis(80), "{other:?}");
        // The token comes 100 ms after the first, however slow the calls.
        assert!(past_burst >= Duration::from_millis(95), "{past_burst:?}");
        assert!(past_burst < Duration::from_secs(2), "{past_burst:?}");
    }

    #[test]
    fn rates_parse_from_rate_slash_burst() {
        assert_eq!("4/8".parse(), Ok(RateLimit::new(4, 8)));
        assert_eq!(" 10 / 20 ".parse(), Ok(RateLimit::new(10, 20)));
        for bad in ["", "5", "0/5", "5/0", "fast/1", "1/2/3", "-1/2"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn default_ceilings_are_at_least_aws_load_balancer_controllers() {
        // Its defaults: ELBv2 RegisterTargets|DeregisterTargets 4/20,
        // Describe* 10/40, everything else 10/40 or less (Modify* 3/20).
        let d = RateLimits::default();
        assert_eq!(d.read, RateLimit::new(20, 40));
        assert_eq!(d.targets, RateLimit::new(10, 20));
        assert_eq!(d.write, RateLimit::new(10, 20));
    }

    /// However often the cloud throttles, the call goes on (paced by the
    /// slowed bucket) and is not a failed attempt; each request is
    /// recorded, and the gauge shows the cut.
    #[tokio::test]
    async fn throttles_slow_the_group_and_do_not_fail_the_call() {
        let mut registry = Registry::default();
        let calls = calls(unlimited(), &mut registry);
        let attempts = AtomicUsize::new(0);
        let out = calls
            .run("DescribeTags", || async {
                match attempts.fetch_add(1, Ordering::SeqCst) {
                    n if n < MAX_ATTEMPTS + 2 => Err(throttled()),
                    n => Ok(n),
                }
            })
            .await;
        assert_eq!(out, Ok(MAX_ATTEMPTS + 2));
        let text = text(&registry);
        let labels = r#"provider="aws",operation="DescribeTags""#;
        let (requests, throttles) = (MAX_ATTEMPTS + 3, MAX_ATTEMPTS + 2);
        for line in [
            format!("cnlb_cloud_api_calls_total{{{labels}}} {requests}"),
            format!("cnlb_cloud_api_throttles_total{{{labels}}} {throttles}"),
            format!(r#"cnlb_cloud_api_errors_total{{{labels},kind="throttled"}} {throttles}"#),
            format!("cnlb_cloud_api_duration_seconds_count{{{labels}}} {requests}"),
            format!(r#"cnlb_cloud_api_duration_seconds_bucket{{le="+Inf",{labels}}} {requests}"#),
            r#"cnlb_cloud_api_duration_seconds_bucket{le="0.005","#.to_string(),
            "# UNIT cnlb_cloud_api_duration_seconds seconds".to_string(),
            // Throttles within a second of each other cut once.
            r#"cnlb_cloud_api_rate{provider="aws",group="read"} 5000"#.to_string(),
            r#"cnlb_cloud_api_rate{provider="aws",group="write"} 10000"#.to_string(),
        ] {
            assert!(text.contains(&line), "no {line} in\n{text}");
        }

        // A cloud that never stops throttling: the throttle is returned
        // after MAX_THROTTLED requests, without backoff retries on top.
        attempts.store(0, Ordering::SeqCst);
        let out: Result<()> = calls
            .run("DescribeTags", || async {
                attempts.fetch_add(1, Ordering::SeqCst);
                Err(throttled())
            })
            .await;
        assert_eq!(out, Err(throttled()));
        assert_eq!(attempts.load(Ordering::SeqCst), MAX_THROTTLED);
    }
}
