//! The agent: answers the CNI plugin from the pool, makes every change
//! durable in the store before answering, and keeps the pool between its
//! watermarks through the backend.
//!
//! Crash safety comes from the order of things: an allocation is committed
//! before the plugin hears of it (a retried ADD gets the same address, and
//! a failed one is undone by the runtime's DEL or GC); the cloud's view is
//! read again on every start, so addresses acquired or released around a
//! crash are neither lost nor handed out twice.

use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{error, info, warn};

use crate::backend::{Assigned, Backend, BackendError};
use crate::cidr::Cidr;
use crate::cni::ErrorCode;
use crate::datapath::{Datapath, DatapathConfig, DatapathError};
use crate::metrics::Metrics;
use crate::pool::{Plan, Pool, TargetFlags, Targets, batch_wait};
use crate::protocol::{AttachmentKey, Lease, PodRef, Request, Response};
use crate::store::{Allocation, Change, Operation, Store, StoreError};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The watermark flags; defaults come from the backend once started.
    pub targets: TargetFlags,
    /// How long a released address is not handed out again.
    pub cooldown: Duration,
    /// How long an ADD waits for an address when the pool is empty.
    pub add_timeout: Duration,
    /// How long a refill that is not urgent waits, so that a burst of ADDs
    /// becomes one cloud call.
    pub batch_delay: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error("cannot set up the node's routing: {0}")]
    Datapath(#[from] DatapathError),
}

pub struct Agent {
    backend: Arc<dyn Backend>,
    /// Policy routing of the Pods' addresses, where the backend needs it.
    datapath: Option<Datapath>,
    store: Store,
    pool: Mutex<Pool>,
    config: AgentConfig,
    targets: Targets,
    metrics: Metrics,
    /// The pool changed: waiting ADDs look again.
    changed: Notify,
    /// Something happened that may change the plan: the pool task looks.
    wake: Notify,
    waiting: AtomicUsize,
    /// The last backend failure, for the details of a timed-out ADD.
    last_error: Mutex<Option<String>>,
    op_counter: AtomicU64,
}

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every change under these locks is made whole before it is unlocked.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn lease(allocation: &Allocation, backend: &dyn Backend) -> Option<Lease> {
    Some(Lease {
        address: Cidr::new(allocation.ip, allocation.subnet.prefix_len()).ok()?,
        gateway: backend.pod_gateway(&allocation.subnet)?,
    })
}

/// Counts an ADD as waiting while it is alive.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::SeqCst);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Agent {
    /// Loads the store, reconciles it with what the backend really has
    /// assigned, rebuilds the node's routing from the allocations (with
    /// `routing`), and returns an agent ready to serve.
    pub async fn start(
        backend: Arc<dyn Backend>,
        store: Store,
        config: AgentConfig,
        routing: Option<DatapathConfig>,
        metrics: Metrics,
    ) -> Result<Arc<Agent>, StartError> {
        let snapshot = store.load()?;
        for (id, op) in &snapshot.operations {
            warn!(
                id,
                ?op,
                "cloud operation interrupted by a restart; the cloud's view decides"
            );
        }
        backend.start().await?;
        let targets = config.targets.resolve(backend.refill_unit());
        metrics.set_targets(targets);
        let mut pool = Pool::new(backend.assigned().await?, &snapshot);

        let orphans = pool.orphans();
        if !orphans.is_empty() && backend.elastic() {
            let wanted: Vec<Assigned> = orphans
                .iter()
                .map(|(_, a)| Assigned {
                    ip: a.ip,
                    subnet: a.subnet,
                    holder: String::new(),
                })
                .collect();
            let lost = backend.reassign(&wanted).await?;
            metrics.backend_operation("reassign", lost.is_empty());
            pool.replace_assigned(backend.assigned().await?);
            for ip in lost {
                error!(%ip, "an allocated address is no longer assigned to this node and could not be assigned again; its Pod has no working address");
            }
        }
        for (key, a) in pool.orphans() {
            warn!(%key, ip = %a.ip, "allocation outside this node's addresses; kept until its DEL");
        }

        // What the interrupted operations did is now in the pool; cooldowns
        // of addresses the node no longer holds mean nothing.
        let mut changes: Vec<Change> = snapshot
            .operations
            .keys()
            .map(|id| Change::EndOperation(id.clone()))
            .collect();
        changes.extend(
            snapshot
                .cooldowns
                .keys()
                .filter(|ip| !pool.is_assigned(ip))
                .map(|ip| Change::ForgetCooldown(*ip)),
        );
        if !changes.is_empty() {
            store.apply(&changes)?;
        }

        let datapath = match routing {
            Some(routing) => {
                let pods: Vec<(IpAddr, Option<String>)> = pool
                    .allocations()
                    .map(|(_, a)| (a.ip, pool.holder(&a.ip).map(str::to_string)))
                    .collect();
                Some(Datapath::start(routing, backend.clone(), &pods).await?)
            }
            None => None,
        };

        let counts = pool.counts(now_ms());
        metrics.set_counts(counts);
        info!(
            backend = backend.name(),
            assigned = counts.assigned,
            allocated = counts.allocated,
            cooling = counts.cooling,
            free = counts.free,
            min_target = targets.min,
            warm_target = targets.warm,
            max_target = targets.max,
            "state reconciled with the backend"
        );
        Ok(Arc::new(Agent {
            backend,
            datapath,
            store,
            pool: Mutex::new(pool),
            config,
            targets,
            metrics,
            changed: Notify::new(),
            wake: Notify::new(),
            waiting: AtomicUsize::new(0),
            last_error: Mutex::new(None),
            op_counter: AtomicU64::new(0),
        }))
    }

    pub async fn handle(&self, request: Request) -> Response {
        let (command, response) = match request {
            Request::Add { key, pod } => {
                let started = Instant::now();
                let response = self.add(&key, pod).await;
                self.metrics
                    .add_duration
                    .observe(started.elapsed().as_secs_f64());
                ("ADD", response)
            }
            Request::Del { key } => ("DEL", self.del(&[key]).await),
            Request::Check { key, ips } => ("CHECK", self.check(&key, &ips)),
            Request::Gc { valid } => ("GC", self.gc(&valid).await),
            Request::Status => ("STATUS", self.status()),
        };
        self.metrics
            .request(command, !matches!(response, Response::Error { .. }));
        response
    }

    async fn add(&self, key: &AttachmentKey, pod: PodRef) -> Response {
        let deadline = Instant::now() + self.config.add_timeout;
        let mut waiting = None;
        loop {
            // Registered before looking, so a change in between is not missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            match self.try_allocate(key, &pod) {
                Ok(Some((lease, holder))) => return self.route(lease, holder).await,
                Ok(None) => {}
                Err(err) => return store_failed(err),
            }
            if waiting.is_none() {
                waiting = Some(Waiting::new(&self.waiting));
                self.metrics.add_waits.inc();
            }
            self.wake.notify_one();
            let now = Instant::now();
            if now >= deadline {
                return self.pool_empty_error();
            }
            // A cooling address may become free before anything notifies.
            let wake_at = lock(&self.pool)
                .next_cooldown_end(now_ms())
                .map(|end| now + Duration::from_millis(end.saturating_sub(now_ms())))
                .map_or(deadline, |at| at.min(deadline));
            let _ = tokio::time::timeout_at(wake_at, changed).await;
        }
    }

    /// Routes the leased address (with a datapath) before the ADD answers:
    /// a Pod must not start with an address whose replies EC2 would drop.
    /// On failure the allocation stays for the runtime's DEL.
    async fn route(&self, lease: Lease, holder: String) -> Response {
        let Some(datapath) = &self.datapath else {
            return Response::Allocated(lease);
        };
        let started = Instant::now();
        let routed = datapath.add_pod(lease.address.addr(), &holder).await;
        self.metrics
            .route_duration
            .observe(started.elapsed().as_secs_f64());
        match routed {
            Ok(()) => Response::Allocated(lease),
            Err(err) => {
                error!(ip = %lease.address.addr(), eni = %holder, error = %err, "cannot route a Pod address");
                Response::error(
                    ErrorCode::IoFailure,
                    "the vpc-ipam agent cannot route the Pod's address",
                    err.to_string(),
                )
            }
        }
    }

    /// A lease for `key` and the holder of its address.
    fn try_allocate(
        &self,
        key: &AttachmentKey,
        pod: &PodRef,
    ) -> Result<Option<(Lease, String)>, StoreError> {
        let mut pool = lock(&self.pool);
        let holder = |pool: &Pool, ip: &IpAddr| pool.holder(ip).unwrap_or_default().to_string();
        if let Some(existing) = pool.lookup(key) {
            // A retried ADD: the same address again.
            return Ok(
                lease(existing, self.backend.as_ref()).map(|l| (l, holder(&pool, &existing.ip)))
            );
        }
        let now = now_ms();
        let Some(free) = pool.pick(now) else {
            return Ok(None);
        };
        let allocation = Allocation {
            ip: free.ip,
            subnet: free.subnet,
            pod: pod.clone(),
            allocated_at: now,
        };
        let Some(lease) = lease(&allocation, self.backend.as_ref()) else {
            return Ok(None);
        };
        self.store
            .apply(&[Change::Allocate(key.clone(), allocation.clone())])?;
        let held_by = holder(&pool, &allocation.ip);
        pool.allocate(key.clone(), allocation);
        self.metrics.set_counts(pool.counts(now));
        drop(pool);
        self.wake.notify_one();
        Ok(Some((lease, held_by)))
    }

    fn pool_empty_error(&self) -> Response {
        let counts = lock(&self.pool).counts(now_ms());
        let cause = lock(&self.last_error)
            .clone()
            .map(|e| format!("; last {} backend error: {e}", self.backend.name()))
            .unwrap_or_default();
        Response::error(
            ErrorCode::TryAgainLater,
            "no free Pod address on this node",
            format!(
                "waited {:?}: {} addresses assigned, {} allocated, {} cooling down{cause}",
                self.config.add_timeout, counts.assigned, counts.allocated, counts.cooling
            ),
        )
    }

    /// Frees the allocations of `keys` in one transaction; unknown keys are
    /// already free. Their routing goes first: an address must not be
    /// handed out again while a rule of its former Pod is left.
    async fn del(&self, keys: &[AttachmentKey]) -> Response {
        if let Some(datapath) = &self.datapath {
            let ips: Vec<IpAddr> = {
                let pool = lock(&self.pool);
                keys.iter()
                    .filter_map(|k| pool.lookup(k))
                    .map(|a| a.ip)
                    .collect()
            };
            for ip in ips {
                let started = Instant::now();
                let removed = datapath.del_pod(ip).await;
                self.metrics
                    .route_duration
                    .observe(started.elapsed().as_secs_f64());
                if let Err(err) = removed {
                    error!(%ip, error = %err, "cannot remove a Pod address's routing");
                    return Response::error(
                        ErrorCode::IoFailure,
                        "the vpc-ipam agent cannot remove the Pod's routing",
                        err.to_string(),
                    );
                }
            }
        }
        let mut pool = lock(&self.pool);
        let now = now_ms();
        let until = now.saturating_add(duration_ms(self.config.cooldown));
        let mut changes = Vec::new();
        for key in keys {
            if let Some(a) = pool.lookup(key) {
                // An address the node no longer holds has nothing to cool.
                let cooldown = pool.is_assigned(&a.ip).then_some(until);
                changes.push(Change::Free(key.clone(), a.ip, cooldown));
            }
        }
        if changes.is_empty() {
            return Response::Ok { released: 0 };
        }
        if let Err(err) = self.store.apply(&changes) {
            return store_failed(err);
        }
        for change in &changes {
            if let Change::Free(key, _, cooldown) = change {
                pool.free(key, *cooldown);
            }
        }
        self.metrics.set_counts(pool.counts(now));
        drop(pool);
        self.changed.notify_waiters();
        self.wake.notify_one();
        Response::Ok {
            released: changes.len(),
        }
    }

    fn check(&self, key: &AttachmentKey, ips: &[IpAddr]) -> Response {
        let pool = lock(&self.pool);
        let Some(a) = pool.lookup(key) else {
            return Response::error(
                ErrorCode::UnknownContainer,
                "no address is allocated to this container interface",
                format!("the agent has no allocation for {key}"),
            );
        };
        if let Some(other) = ips.iter().find(|ip| **ip != a.ip) {
            return Response::error(
                ErrorCode::UnknownContainer,
                "the container's address is not the one allocated to it",
                format!(
                    "{key} has {other} in its previous result, but {} is allocated",
                    a.ip
                ),
            );
        }
        if !pool.is_assigned(&a.ip) {
            return Response::error(
                ErrorCode::TryAgainLater,
                "the container's address is no longer assigned to this node",
                format!(
                    "{} is allocated to {key}, but the {} backend no longer assigns it",
                    a.ip,
                    self.backend.name()
                ),
            );
        }
        Response::Ok { released: 0 }
    }

    async fn gc(&self, valid: &[AttachmentKey]) -> Response {
        let stale: Vec<AttachmentKey> = lock(&self.pool)
            .allocations()
            .map(|(k, _)| k)
            .filter(|k| !valid.contains(k))
            .cloned()
            .collect();
        for key in &stale {
            info!(%key, "GC: releasing the allocation of a container the runtime no longer has");
        }
        self.del(&stale).await
    }

    fn status(&self) -> Response {
        let counts = lock(&self.pool).counts(now_ms());
        // A cloud pool can grow; a fixed one serves ADD only with addresses
        // free now or cooling down.
        if self.backend.elastic() || counts.free > 0 || counts.cooling > 0 {
            return Response::Ok { released: 0 };
        }
        Response::error(
            ErrorCode::PluginNotAvailable,
            "every Pod address of this node is allocated",
            format!("{} of {} allocated", counts.allocated, counts.assigned),
        )
    }

    /// Keeps the pool between its watermarks, for a backend that can grow
    /// and shrink. Runs until the process exits.
    pub async fn run_pool(self: Arc<Self>) {
        // End of the batch window a refill that is not urgent opened (ms).
        let mut batch_end = None;
        let mut failures: u32 = 0;
        let mut resync = false;
        loop {
            let result = if resync {
                self.resync().await
            } else {
                let plan = {
                    let pool = lock(&self.pool);
                    pool.plan(now_ms(), self.targets, self.waiting.load(Ordering::SeqCst))
                };
                let now = now_ms();
                let delay = duration_ms(self.config.batch_delay);
                if let Some(end) = batch_wait(&plan, now, batch_end, delay) {
                    batch_end = Some(end);
                    // Every request wakes this to plan again: an ADD that
                    // finds the pool empty makes the refill urgent, which
                    // ends the batch at once.
                    let wait = Duration::from_millis(end.saturating_sub(now));
                    let _ = tokio::time::timeout(wait, self.wake.notified()).await;
                    continue;
                }
                match plan {
                    Plan::Nothing => {
                        batch_end = None;
                        self.idle().await;
                        continue;
                    }
                    Plan::Acquire { count, .. } => self.acquire(count).await,
                    Plan::Release(ips) => {
                        // Whatever the release did, the cloud has the truth.
                        resync = true;
                        self.release(&ips).await
                    }
                }
            };
            batch_end = None;
            match result {
                Ok(resynced) => {
                    failures = 0;
                    resync = resync && !resynced;
                    *lock(&self.last_error) = None;
                }
                Err(err) => {
                    failures = failures.saturating_add(1);
                    warn!(error = %err, failures, "pool change failed; retrying");
                    *lock(&self.last_error) = Some(err.to_string());
                    // Retry sooner for throttling than for a broken config,
                    // but never in a tight loop: 1 s doubling to 60 s.
                    let cap = if err.is_transient() { 30 } else { 60 };
                    let secs = 1u64
                        .checked_shl(failures.saturating_sub(1).min(6))
                        .unwrap_or(cap)
                        .min(cap);
                    tokio::time::sleep(Duration::from_secs(secs)).await;
                }
            }
        }
    }

    /// Waits until something may change the plan: a request, or the end of
    /// a cooldown (which can push the pool over its maximum).
    async fn idle(&self) {
        let next = lock(&self.pool).next_cooldown_end(now_ms());
        match next {
            Some(end) => {
                let wait = Duration::from_millis(end.saturating_sub(now_ms()));
                let _ = tokio::time::timeout(wait, self.wake.notified()).await;
            }
            None => self.wake.notified().await,
        }
    }

    fn next_op_id(&self, kind: &str) -> String {
        let n = self.op_counter.fetch_add(1, Ordering::Relaxed);
        format!("{kind}-{:x}-{:x}-{n}", now_ms(), std::process::id())
    }

    /// Runs a backend call bracketed by an operation record, so a restart
    /// knows it was interrupted.
    async fn recorded<T>(
        &self,
        id: &str,
        operation: Operation,
        call: impl Future<Output = Result<T, BackendError>>,
    ) -> Result<T, BackendError> {
        let persist = |change| {
            self.store
                .apply(&[change])
                .map_err(|e| BackendError::Transient(e.to_string()))
        };
        persist(Change::BeginOperation(id.to_owned(), operation))?;
        let result = call.await;
        persist(Change::EndOperation(id.to_owned()))?;
        result
    }

    /// Returns whether the pool was re-read from the backend.
    async fn acquire(&self, count: usize) -> Result<bool, BackendError> {
        let id = self.next_op_id("acquire");
        let op = Operation::Acquire {
            count,
            started_at: now_ms(),
        };
        let result = self
            .recorded(&id, op, self.backend.acquire(count, &id))
            .await;
        self.metrics.backend_operation("acquire", result.is_ok());
        let added = result?;
        info!(asked = count, added = added.len(), "acquired addresses");
        let mut pool = lock(&self.pool);
        pool.add_assigned(added);
        self.metrics.set_counts(pool.counts(now_ms()));
        drop(pool);
        self.changed.notify_waiters();
        Ok(false)
    }

    async fn release(&self, ips: &[IpAddr]) -> Result<bool, BackendError> {
        {
            let mut pool = lock(&self.pool);
            pool.start_release(ips);
            self.metrics.set_counts(pool.counts(now_ms()));
        }
        let id = self.next_op_id("release");
        let op = Operation::Release {
            ips: ips.to_vec(),
            started_at: now_ms(),
        };
        let result = self.recorded(&id, op, self.backend.release(ips)).await;
        self.metrics.backend_operation("release", result.is_ok());
        result?;
        info!(released = ips.len(), "released surplus addresses");
        self.resync().await
    }

    async fn resync(&self) -> Result<bool, BackendError> {
        let assigned = self.backend.assigned().await?;
        let mut pool = lock(&self.pool);
        pool.replace_assigned(assigned);
        self.metrics.set_counts(pool.counts(now_ms()));
        drop(pool);
        self.changed.notify_waiters();
        Ok(true)
    }

    /// Deletes leaked cloud resources every `interval`.
    pub async fn run_garbage_collection(self: Arc<Self>, interval: Duration) {
        loop {
            match self.backend.collect_garbage().await {
                Ok(0) => self.metrics.backend_operation("gc", true),
                Ok(n) => {
                    self.metrics.backend_operation("gc", true);
                    info!(deleted = n, "deleted leaked cloud resources");
                }
                Err(err) => {
                    self.metrics.backend_operation("gc", false);
                    warn!(error = %err, "garbage collection failed");
                }
            }
            tokio::time::sleep(interval).await;
        }
    }

    pub fn elastic(&self) -> bool {
        self.backend.elastic()
    }
}

fn store_failed(err: StoreError) -> Response {
    error!(error = %err, "cannot write the state store");
    Response::error(
        ErrorCode::IoFailure,
        "the vpc-ipam agent cannot write its state",
        err.to_string(),
    )
}
