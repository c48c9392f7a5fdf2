//! The HTTP endpoints for the kubelet and Prometheus: `/healthz`,
//! `/readyz` and `/metrics`.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// In-flight requests get this long to finish on [`Server::stop`].
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// What `/metrics` serves: the OpenMetrics text of a registry.
pub trait MetricsText: Send + Sync + 'static {
    fn encode(&self) -> Result<String, std::fmt::Error>;
}

impl MetricsText for Registry {
    fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, self)?;
        Ok(text)
    }
}

/// What `/readyz` reports: not ready (503 with `waiting_for`) until
/// [`Health::set_ready`].
pub struct Health {
    ready: AtomicBool,
    waiting_for: &'static str,
}

impl Health {
    /// `waiting_for` says why the process is not ready yet.
    pub fn new(waiting_for: &'static str) -> Health {
        Health {
            ready: AtomicBool::new(false),
            waiting_for,
        }
    }

    pub fn set_ready(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }
}

#[derive(Clone)]
struct AppState {
    health: Arc<Health>,
    metrics: Arc<dyn MetricsText>,
}

fn router(health: Arc<Health>, metrics: Arc<dyn MetricsText>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { health, metrics })
}

/// The server task and the sender that stops it.
pub struct Server {
    stop: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Serves on `listener` until [`stop`](Self::stop).
    pub fn start(
        listener: TcpListener,
        health: Arc<Health>,
        metrics: Arc<dyn MetricsText>,
    ) -> Server {
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, health, metrics, async {
            // A dropped sender also stops the server.
            let _ = stopped.await;
        }));
        Server { stop, task }
    }

    /// Stops accepting and lets in-flight requests finish, for a while.
    pub async fn stop(self) -> std::io::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(DRAIN_TIMEOUT, self.task).await {
            Ok(Ok(result)) => result,
            Ok(Err(join_error)) => {
                tracing::error!(error = %join_error, "HTTP server task failed");
                Ok(())
            }
            Err(_) => {
                tracing::warn!("HTTP server did not drain in time; exiting anyway");
                Ok(())
            }
        }
    }
}

/// Serves until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    metrics: Arc<dyn MetricsText>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(health, metrics))
        .with_graceful_shutdown(shutdown)
        .await
}

// Liveness: answering at all means the runtime is alive.
async fn healthz() -> &'static str {
    "ok"
}

async fn readyz(State(state): State<AppState>) -> (StatusCode, &'static str) {
    if state.health.is_ready() {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, state.health.waiting_for)
    }
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(body) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(err) => {
            tracing::error!(error = %err, "cannot encode metrics");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A real HTTP/1.1 request over TCP, so the test covers the server as
    /// the kubelet and Prometheus see it.
    async fn get(addr: std::net::SocketAddr, path: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).await.unwrap();
        response
    }

    #[tokio::test]
    async fn probes_and_metrics() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let health = Arc::new(Health::new("the test has not said so"));
        let mut registry = Registry::default();
        let counter = Counter::<u64>::default();
        registry.register("things", "Things counted", counter.clone());
        counter.inc();
        let server = Server::start(listener, health.clone(), Arc::new(registry));

        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(addr, "/readyz").await;
        assert!(not_ready.starts_with("HTTP/1.1 503"), "{not_ready}");
        assert!(
            not_ready.ends_with("the test has not said so"),
            "{not_ready}"
        );
        health.set_ready();
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        let metrics = get(addr, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("things_total 1"), "{metrics}");
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));

        server.stop().await.unwrap();
        assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    }
}
