//! The controller's one HTTP endpoint (`--http-addr`):
//!
//! - `/metrics`: the [`Metrics`] as OpenMetrics text;
//! - `/healthz` (`/livez`): 200 while the process serves requests;
//! - `/readyz`: 200 when every readiness [`Check`] passes, else 503 with the failures.
//!
//! Checks are closures, so the test hypervisor (or anything else) can stand in for
//! libvirt. The routes are an axum [`Router`]; connections are served by hyper-util's
//! HTTP/1.1 builder, which axum's own `serve` does not expose, so a client that never
//! finishes its request headers is dropped after 10 s.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::FutureExt;
use futures::future::BoxFuture;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{Api, Client};
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

use crate::error::Error;
use crate::hypervisor::libvirt::Libvirt;
use crate::metrics::{CONTENT_TYPE as METRICS_CONTENT_TYPE, Metrics};

/// Bound on each readiness check, so a hung hypervisor makes `/readyz` fail, not hang.
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on reading a request's headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long open connections may take to finish after shutdown began.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause after a failed `accept` (for example out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// One readiness check: `Err` carries the reason shown by `/readyz`.
pub type Check = Arc<dyn Fn() -> BoxFuture<'static, Result<(), String>> + Send + Sync>;

/// The named checks behind `/readyz`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, Check)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check.
    pub fn with(mut self, name: &'static str, check: Check) -> Self {
        self.checks.push((name, check));
        self
    }

    /// Runs every check concurrently, each bounded by [`CHECK_TIMEOUT`].
    pub async fn run(&self) -> Vec<(&'static str, Result<(), String>)> {
        futures::future::join_all(self.checks.iter().map(|(name, check)| async move {
            let result = match tokio::time::timeout(CHECK_TIMEOUT, check()).await {
                Ok(result) => result,
                Err(_) => Err(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
            };
            (*name, result)
        }))
        .await
    }
}

/// Name of the CRD whose presence `/readyz` checks.
pub const CRD_NAME: &str = "benchclusters.benchcluster.dev";

/// Passes once the BenchCluster CRD exists and is Established. Once it passed it stays
/// passed (no API call per probe): the watch reports later trouble.
pub fn crd_check(client: Client) -> Check {
    let found = Arc::new(AtomicBool::new(false));
    Arc::new(move || {
        let client = client.clone();
        let found = Arc::clone(&found);
        async move {
            if found.load(Ordering::Acquire) {
                return Ok(());
            }
            let crds: Api<CustomResourceDefinition> = Api::all(client);
            let crd = crds
                .get_opt(CRD_NAME)
                .await
                .map_err(|e| format!("cannot read CRD {CRD_NAME}: {e}"))?
                .ok_or_else(|| format!("CRD {CRD_NAME} is not installed"))?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                found.store(true, Ordering::Release);
                Ok(())
            } else {
                Err(format!("CRD {CRD_NAME} is not Established yet"))
            }
        }
        .boxed()
    })
}

/// Passes while `ok()` is true; `Err(reason)` otherwise.
pub fn flag_check(reason: &'static str, ok: impl Fn() -> bool + Send + Sync + 'static) -> Check {
    Arc::new(move || {
        let result = if ok() { Ok(()) } else { Err(reason.to_owned()) };
        futures::future::ready(result).boxed()
    })
}

/// Passes while libvirt answers a round trip (reconnecting if the connection dropped).
pub fn libvirt_check(libvirt: Libvirt) -> Check {
    Arc::new(move || {
        let libvirt = libvirt.clone();
        async move {
            libvirt
                .check_connection()
                .await
                .map_err(|e| Error::from(e).chain())
        }
        .boxed()
    })
}

/// What the handlers share.
struct Endpoint {
    metrics: Arc<Metrics>,
    readiness: Readiness,
}

type Shared = Arc<Endpoint>;

const TEXT: &str = "text/plain; charset=utf-8";

fn text(status: StatusCode, body: impl Into<String>) -> Response {
    (status, [(CONTENT_TYPE, TEXT)], body.into()).into_response()
}

async fn metrics(State(endpoint): State<Shared>) -> Response {
    match endpoint.metrics.encode() {
        Ok(body) => (StatusCode::OK, [(CONTENT_TYPE, METRICS_CONTENT_TYPE)], body).into_response(),
        Err(_) => text(StatusCode::INTERNAL_SERVER_ERROR, "cannot encode metrics\n"),
    }
}

async fn healthz() -> Response {
    text(StatusCode::OK, "ok\n")
}

async fn readyz(State(endpoint): State<Shared>) -> Response {
    let results = endpoint.readiness.run().await;
    let mut body = String::new();
    let mut ready = true;
    for (name, result) in &results {
        match result {
            Ok(()) => body.push_str(&format!("[+]{name} ok\n")),
            Err(reason) => {
                ready = false;
                body.push_str(&format!("[-]{name} failed: {reason}\n"));
            }
        }
    }
    if ready {
        body.push_str("ok\n");
        text(StatusCode::OK, body)
    } else {
        debug!(%body, "not ready");
        text(StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn get_only() -> Response {
    text(StatusCode::METHOD_NOT_ALLOWED, "GET only\n")
}

/// Any other path: 404 for a GET (or HEAD), 405 for any other method, as on the routes.
async fn not_found(method: Method) -> Response {
    if method == Method::GET || method == Method::HEAD {
        text(StatusCode::NOT_FOUND, "not found\n")
    } else {
        get_only().await
    }
}

/// The routes: GET (and HEAD, answered without a body) on `/metrics`, `/healthz`,
/// `/livez` and `/readyz`.
pub fn router(metrics: Arc<Metrics>, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(self::metrics))
        .route("/healthz", get(healthz))
        .route("/livez", get(healthz))
        .route("/readyz", get(readyz))
        .method_not_allowed_fallback(get_only)
        .fallback(not_found)
        .with_state(Arc::new(Endpoint { metrics, readiness }))
}

/// Serves [`router`] on `listener` until `shutdown` resolves, then lets open requests
/// finish (for at most 5 s) and returns.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Readiness,
    shutdown: impl Future<Output = ()>,
) {
    let service = TowerToHyperService::new(router(metrics, readiness));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving /metrics, /healthz, /readyz");
    }
    futures::pin_mut!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let stream = match accepted {
                    Ok((stream, _peer)) => stream,
                    Err(error) => {
                        warn!(%error, "cannot accept an HTTP connection");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let connection = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_READ_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), service.clone());
                let connection = graceful.watch(connection);
                tokio::spawn(async move {
                    if let Err(error) = connection.await {
                        debug!(%error, "HTTP connection ended with an error");
                    }
                });
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        warn!("HTTP connections still open after shutdown; dropping them");
    }
    info!("HTTP server stopped");
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_hung_check_fails_within_the_bound() {
        let hung: Check = Arc::new(|| futures::future::pending().boxed());
        let readiness = Readiness::new()
            .with("fine", flag_check("never", || true))
            .with("down", flag_check("it is down", || false))
            .with("hung", hung);
        let results = readiness.run().await;
        assert_eq!(results[0], ("fine", Ok(())));
        assert_eq!(results[1], ("down", Err("it is down".to_owned())));
        assert_eq!(results[2].0, "hung");
        assert!(results[2].1.as_ref().unwrap_err().contains("no answer"));
    }

    /// Status, Content-Type and body of `method path` on the router.
    async fn call(router: &Router, method: Method, path: &str) -> (StatusCode, String, String) {
        use tower::ServiceExt as _;
        let request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.clone().oneshot(request).await.unwrap();
        let status = response.status();
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .map(|v| v.to_str().unwrap().to_owned())
            .unwrap_or_default();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            content_type,
            String::from_utf8(body.to_vec()).unwrap(),
        )
    }

    #[tokio::test]
    async fn routes_answer_with_their_status_type_and_body() {
        let ready = router(
            Arc::new(Metrics::new()),
            Readiness::new().with("fine", flag_check("never", || true)),
        );
        let (status, content_type, body) = call(&ready, Method::GET, "/metrics").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, METRICS_CONTENT_TYPE);
        assert!(body.contains("benchcluster_leader"), "{body}");
        assert!(body.ends_with("# EOF\n"), "{body}");
        for path in ["/healthz", "/livez"] {
            assert_eq!(
                call(&ready, Method::GET, path).await,
                (StatusCode::OK, TEXT.to_owned(), "ok\n".to_owned())
            );
        }
        assert_eq!(
            call(&ready, Method::GET, "/readyz").await,
            (
                StatusCode::OK,
                TEXT.to_owned(),
                "[+]fine ok\nok\n".to_owned()
            )
        );
        // HEAD is a GET without the body.
        let (status, content_type, body) = call(&ready, Method::HEAD, "/healthz").await;
        assert_eq!(
            (status, content_type.as_str(), body.as_str()),
            (StatusCode::OK, TEXT, "")
        );
        assert_eq!(
            call(&ready, Method::GET, "/nowhere").await,
            (
                StatusCode::NOT_FOUND,
                TEXT.to_owned(),
                "not found\n".to_owned()
            )
        );
        for path in ["/metrics", "/readyz", "/nowhere"] {
            assert_eq!(
                call(&ready, Method::POST, path).await,
                (
                    StatusCode::METHOD_NOT_ALLOWED,
                    TEXT.to_owned(),
                    "GET only\n".to_owned()
                ),
                "POST {path}"
            );
        }

        let unready = router(
            Arc::new(Metrics::new()),
            Readiness::new()
                .with("fine", flag_check("never", || true))
                .with("down", flag_check("it is down", || false)),
        );
        assert_eq!(
            call(&unready, Method::GET, "/readyz").await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                TEXT.to_owned(),
                "[+]fine ok\n[-]down failed: it is down\n".to_owned()
            )
        );
        assert_eq!(
            call(&unready, Method::GET, "/healthz").await.0,
            StatusCode::OK
        );
    }
}
