//! A fault-injecting cloud: an HTTP proxy in front of moto or the GCE
//! emulator that, per operation and from a seed, answers with the cloud's
//! real throttling and 5xx errors, adds latency, or drops the connection
//! before the request reaches the emulator or after it did (the call
//! happened, its answer is lost). It records every call (operation, time,
//! outcome), so tests and benchmarks count what the product did from the
//! outside.
//!
//! It can also enforce the clouds' documented rate limits, as the account
//! would ([`limits`]): calls past them get the real throttling answer.
//!
//! It runs on its own thread and runtime, so it keeps serving whatever the
//! test's runtime does (block_on, current_thread).

mod answers;
pub mod limits;
mod operation;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::sync::oneshot;

pub use answers::Injected;
pub use limits::AccountLimits;

/// Which cloud is behind the proxy: how operations are named and what its
/// errors look like.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cloud {
    /// moto: EC2 and ELBv2 (query protocol) on one port.
    Aws,
    /// The GCE emulator (REST).
    Gce,
}

/// What to do to the calls of one operation: each call draws once, and the
/// probabilities are taken in this order (their sum is at most 1).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Faults {
    /// The cloud's throttling error (EC2 `RequestLimitExceeded`, ELBv2
    /// `Throttling`, GCE 429 `rateLimitExceeded` or 403
    /// `userRateLimitExceeded`).
    pub throttle: f64,
    /// 500.
    pub server_error: f64,
    /// 503.
    pub unavailable: f64,
    /// The connection is dropped before the request is forwarded.
    pub reset_before: f64,
    /// The request is forwarded and done; the connection is dropped
    /// instead of the answer.
    pub reset_after: f64,
    /// Added to every call before it is answered or forwarded.
    pub latency: Duration,
}

impl Faults {
    /// `rate` of the calls fail, spread evenly over the five kinds.
    pub fn failing(rate: f64) -> Faults {
        let each = rate / 5.0;
        Faults {
            throttle: each,
            server_error: each,
            unavailable: each,
            reset_before: each,
            reset_after: each,
            latency: Duration::ZERO,
        }
    }

    /// Only lost answers: `rate` of the calls happen but the caller never
    /// hears back.
    pub fn lost_answers(rate: f64) -> Faults {
        Faults {
            reset_after: rate,
            ..Faults::default()
        }
    }
}

/// What happened to one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Forwarded, and the emulator's status returned.
    Forwarded(u16),
    /// The proxy answered with this error.
    Injected(Injected),
    /// Dropped before forwarding.
    ResetBefore,
    /// Forwarded (the emulator answered this status), the answer dropped.
    ResetAfter(u16),
    /// Throttled: past the account's limits ([`FaultProxy::set_account_limits`]).
    Limited,
}

impl Outcome {
    /// Whether the caller got the emulator's own answer.
    pub fn answered(self) -> bool {
        matches!(self, Outcome::Forwarded(_))
    }
}

/// One call as the proxy saw it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Call {
    pub operation: String,
    /// When it arrived, since the proxy started.
    pub at: Duration,
    pub outcome: Outcome,
    /// The account's bucket it drew from, when limits are on.
    pub bucket: Option<String>,
}

#[derive(Default)]
struct Rules {
    default: Faults,
    per_operation: BTreeMap<String, Faults>,
}

struct Shared {
    cloud: Cloud,
    upstream: String,
    started: Instant,
    rules: Mutex<Rules>,
    limits: Mutex<Option<AccountLimits>>,
    buckets: Mutex<limits::Buckets>,
    rng: Mutex<fastrand::Rng>,
    calls: Mutex<Vec<Call>>,
    http: reqwest::Client,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

pub struct FaultProxy {
    url: String,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free local port and forwards to `upstream`
    /// (`http://127.0.0.1:PORT`). No faults until [`FaultProxy::set_faults`].
    pub fn start(cloud: Cloud, upstream: &str, seed: u64) -> Result<FaultProxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").context("binding the proxy")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            cloud,
            upstream: upstream.trim_end_matches('/').to_string(),
            started: Instant::now(),
            rules: Mutex::default(),
            limits: Mutex::default(),
            buckets: Mutex::default(),
            rng: Mutex::new(fastrand::Rng::with_seed(seed)),
            calls: Mutex::default(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(60))
                .build()
                .context("building the proxy's client")?,
        });
        let (stop, stopped) = oneshot::channel();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        let state = shared.clone();
        let thread = std::thread::Builder::new()
            .name("fault-proxy".into())
            .spawn(move || runtime.block_on(serve(listener, state, stopped)))?;
        Ok(FaultProxy {
            url: format!("http://{addr}"),
            shared,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Faults for every operation without its own.
    pub fn set_faults(&self, faults: Faults) {
        lock(&self.shared.rules).default = faults;
    }

    /// Faults for one operation (`ec2:CreateSecurityGroup`,
    /// `backendServices.insert`).
    pub fn set_operation_faults(&self, operation: &str, faults: Faults) {
        lock(&self.shared.rules)
            .per_operation
            .insert(operation.to_string(), faults);
    }

    /// Enforces the account's rate limits from now on (`None`: no limits,
    /// the default). Calls past them are throttled before any fault rule.
    pub fn set_account_limits(&self, limits: Option<AccountLimits>) {
        *lock(&self.shared.limits) = limits;
    }

    /// The least time the account's buckets (full at the first of `calls`)
    /// allow for the calls of `calls` that got through: what a client that
    /// knew the limits could do at best. Zero without limits.
    pub fn least_time(&self, calls: &[Call]) -> Duration {
        let mut through: BTreeMap<&str, f64> = BTreeMap::new();
        for call in calls.iter().filter(|c| c.outcome != Outcome::Limited) {
            if let Some(bucket) = &call.bucket {
                *through.entry(bucket.as_str()).or_default() += 1.0;
            }
        }
        let shapes = lock(&self.shared.buckets);
        through
            .into_iter()
            .filter_map(|(name, n)| shapes.shape(name).map(|b| b.least_time(n)))
            .max()
            .unwrap_or_default()
    }

    /// Now, on the clock of [`Call::at`].
    pub fn elapsed(&self) -> Duration {
        self.shared.started.elapsed()
    }

    /// Every call so far, in the order they were answered.
    pub fn calls(&self) -> Vec<Call> {
        lock(&self.shared.calls).clone()
    }

    /// How many calls had each outcome.
    pub fn counts(&self) -> BTreeMap<Outcome, usize> {
        let mut counts = BTreeMap::new();
        for call in lock(&self.shared.calls).iter() {
            *counts.entry(call.outcome).or_default() += 1;
        }
        counts
    }

    /// A one-line summary: calls, injected faults by kind.
    pub fn summary(&self) -> String {
        let calls = self.calls();
        let count = |f: fn(Outcome) -> bool| calls.iter().filter(|c| f(c.outcome)).count();
        format!(
            "{} calls: {} answered, {} over the account's limits, {} throttled, {} 500, {} 503, {} reset before, {} answers lost",
            calls.len(),
            count(Outcome::answered),
            count(|o| o == Outcome::Limited),
            count(|o| o == Outcome::Injected(Injected::Throttle)),
            count(|o| o == Outcome::Injected(Injected::ServerError)),
            count(|o| o == Outcome::Injected(Injected::Unavailable)),
            count(|o| o == Outcome::ResetBefore),
            count(|o| matches!(o, Outcome::ResetAfter(_))),
        )
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn serve(
    listener: std::net::TcpListener,
    shared: Arc<Shared>,
    mut stopped: oneshot::Receiver<()>,
) {
    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
        return;
    };
    loop {
        let stream = tokio::select! {
            _ = &mut stopped => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(_) => continue,
            },
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| handle(shared.clone(), req));
            // An error from `handle` closes the connection without an
            // answer: that is how a reset is injected.
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// The connection is to be dropped.
#[derive(Debug)]
struct Reset;

impl std::fmt::Display for Reset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected connection reset")
    }
}

impl std::error::Error for Reset {}

enum Decision {
    Forward,
    Inject(Injected, bool),
    ResetBefore,
    ResetAfter,
}

impl Shared {
    fn decide(&self, operation: &str) -> (Decision, Duration) {
        let faults = {
            let rules = lock(&self.rules);
            rules
                .per_operation
                .get(operation)
                .copied()
                .unwrap_or(rules.default)
        };
        let (draw, alternate) = {
            let mut rng = lock(&self.rng);
            (rng.f64(), rng.bool())
        };
        let mut edge = 0.0;
        let mut hit = |p: f64| {
            edge += p;
            draw < edge
        };
        let decision = if hit(faults.throttle) {
            Decision::Inject(Injected::Throttle, alternate)
        } else if hit(faults.server_error) {
            Decision::Inject(Injected::ServerError, alternate)
        } else if hit(faults.unavailable) {
            Decision::Inject(Injected::Unavailable, alternate)
        } else if hit(faults.reset_before) {
            Decision::ResetBefore
        } else if hit(faults.reset_after) {
            Decision::ResetAfter
        } else {
            Decision::Forward
        };
        (decision, faults.latency)
    }

    /// The bucket of the account's limits a call draws from, if any.
    fn bucket_of(&self, operation: &str, body: &[u8]) -> Option<(String, limits::Bucket)> {
        let limits = (*lock(&self.limits))?;
        let filtered = self.cloud == Cloud::Aws && operation::aws_filtered(body);
        limits.bucket(self.cloud, operation, filtered)
    }

    fn record(
        &self,
        operation: String,
        at: Duration,
        outcome: Outcome,
        bucket: Option<(String, limits::Bucket)>,
    ) {
        lock(&self.calls).push(Call {
            operation,
            at,
            outcome,
            bucket: bucket.map(|(name, _)| name),
        });
    }

    async fn forward(
        &self,
        parts: &http::request::Parts,
        body: Bytes,
    ) -> Result<Response<Full<Bytes>>> {
        let path = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let mut request = self
            .http
            .request(parts.method.clone(), format!("{}{path}", self.upstream))
            .body(body);
        for (name, value) in &parts.headers {
            if !hop_by_hop(name) {
                request = request.header(name, value);
            }
        }
        let answer = request.send().await?;
        let mut response = Response::builder().status(answer.status());
        for (name, value) in answer.headers() {
            if !hop_by_hop(name) {
                response = response.header(name, value);
            }
        }
        Ok(response.body(Full::new(answer.bytes().await?))?)
    }
}

/// Headers that belong to one connection (and Host, which reqwest sets
/// from the upstream URL).
fn hop_by_hop(name: &header::HeaderName) -> bool {
    [
        header::HOST,
        header::CONNECTION,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
    ]
    .contains(name)
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> std::result::Result<Response<Full<Bytes>>, Reset> {
    let arrived = shared.started.elapsed();
    let (parts, body) = req.into_parts();
    let body = body.collect().await.map_err(|_| Reset)?.to_bytes();
    let (operation, service) = match shared.cloud {
        Cloud::Aws => {
            let auth = parts
                .headers
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok());
            let operation = operation::aws(auth, &body);
            let service = operation.split(':').next().map(str::to_string);
            (operation, service)
        }
        Cloud::Gce => (operation::gce(&parts.method, parts.uri.path()), None),
    };
    let bucket = shared.bucket_of(&operation, &body);
    if bucket
        .as_ref()
        .is_some_and(|(name, b)| !lock(&shared.buckets).take(name, *b, arrived))
    {
        shared.record(operation, arrived, Outcome::Limited, bucket);
        return error_answer(service.as_deref(), Injected::Throttle, false);
    }
    let (decision, latency) = shared.decide(&operation);
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    match decision {
        Decision::Inject(injected, alternate) => {
            let outcome = Outcome::Injected(injected);
            shared.record(operation, arrived, outcome, bucket.clone());
            error_answer(service.as_deref(), injected, alternate)
        }
        Decision::ResetBefore => {
            shared.record(operation, arrived, Outcome::ResetBefore, bucket.clone());
            Err(Reset)
        }
        Decision::Forward | Decision::ResetAfter => {
            let response = match shared.forward(&parts, body).await {
                Ok(response) => response,
                Err(e) => {
                    // The emulator itself failed: the caller sees a 502,
                    // recorded like an answer so nothing is hidden.
                    shared.record(operation, arrived, Outcome::Forwarded(502), bucket.clone());
                    return Response::builder()
                        .status(502)
                        .body(Full::new(Bytes::from(format!("fault proxy: {e:#}"))))
                        .map_err(|_| Reset);
                }
            };
            let status = response.status().as_u16();
            if matches!(decision, Decision::ResetAfter) {
                shared.record(
                    operation,
                    arrived,
                    Outcome::ResetAfter(status),
                    bucket.clone(),
                );
                return Err(Reset);
            }
            shared.record(
                operation,
                arrived,
                Outcome::Forwarded(status),
                bucket.clone(),
            );
            Ok(response)
        }
    }
}

/// The cloud's error answer (see [`answers::answer`]).
fn error_answer(
    service: Option<&str>,
    injected: Injected,
    alternate: bool,
) -> std::result::Result<Response<Full<Bytes>>, Reset> {
    let (status, content_type, text) = answers::answer(service, injected, alternate);
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(Full::new(Bytes::from(text)))
        .map_err(|_| Reset)
}

/// The most calls `pick` selects in any `window` (sliding over the calls'
/// times): what a client-side token bucket of rate r and burst b bounds by
/// b + r * window.
pub fn busiest(calls: &[Call], window: Duration, pick: impl Fn(&Call) -> bool) -> usize {
    let mut times: Vec<Duration> = calls.iter().filter(|c| pick(c)).map(|c| c.at).collect();
    times.sort();
    let mut start = 0;
    let mut most = 0;
    for (end, at) in times.iter().enumerate() {
        while *at - times[start] >= window {
            start += 1;
        }
        most = most.max(end + 1 - start);
    }
    most
}

/// How many times the chaos tests repeat: `CNLB_CHAOS_TRIALS` (`make chaos`
/// sets 100), else `default` (what `make test` affords).
pub fn chaos_trials(default: usize) -> usize {
    env_count("CNLB_CHAOS_TRIALS", default)
}

/// How many Services the chaos tests run: `CNLB_CHAOS_SERVICES` (`make
/// chaos` sets 50), else `default`.
pub fn chaos_services(default: usize) -> usize {
    env_count("CNLB_CHAOS_SERVICES", default)
}

fn env_count(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
