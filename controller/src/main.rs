//! `benchcluster-controller`: flags in, the library's pieces wired together, exit code out.
//! Exit 0 after SIGTERM/SIGINT (in-flight reconciles finished), 1 when the leadership
//! was lost or start-up failed, 2 for bad flags.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use benchcluster_controller::guest::ssh::{SshConfig, SshGuest};
use benchcluster_controller::http::{self, Readiness};
use benchcluster_controller::hypervisor::libvirt::{Libvirt, LibvirtConfig};
use benchcluster_controller::hypervisor::metered::Metered;
use benchcluster_controller::leader::{self, Elector, LeaseConfig, Stopped};
use benchcluster_controller::metrics::Metrics;
use benchcluster_controller::telemetry::{self, LogFormat};
use benchcluster_controller::{Context, Settings};
use clap::Parser;
use kube::client::retry::RetryPolicy;
use tracing::{error, info, warn};

/// Reconciles BenchCluster resources into libvirt VMs forming kubeadm clusters.
#[derive(Debug, Parser)]
#[command(name = "benchcluster-controller", version)]
struct Args {
    /// libvirt connection URI (`qemu:///system`, `qemu+ssh://user@host/system`, `test:///default`).
    #[arg(
        long,
        env = "BENCHCLUSTER_LIBVIRT_URI",
        default_value = "qemu:///system"
    )]
    libvirt_uri: String,
    /// Storage pool holding the base images [default: benchcluster-images; default-pool for test:///default].
    #[arg(long, env = "BENCHCLUSTER_IMAGE_POOL")]
    image_pool: Option<String>,
    /// Storage pool where node overlays and seeds are created [default: benchcluster-nodes; default-pool for test:///default].
    #[arg(long, env = "BENCHCLUSTER_NODE_POOL")]
    node_pool: Option<String>,
    /// libvirt domain type: `qemu` (software emulation), `kvm`, `test` [default: `test` for test:// URIs, else `qemu`].
    #[arg(long, env = "BENCHCLUSTER_DOMAIN_TYPE")]
    domain_type: Option<String>,
    /// Watch only this namespace [default: all namespaces].
    #[arg(long, env = "BENCHCLUSTER_NAMESPACE")]
    namespace: Option<String>,
    /// Address of the HTTP endpoint serving /metrics, /healthz and /readyz.
    #[arg(long, env = "BENCHCLUSTER_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    /// Log line format.
    #[arg(long, env = "BENCHCLUSTER_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Log level or RUST_LOG-style directives (`debug`, `info,benchcluster_controller=debug`) [default: RUST_LOG, else info].
    #[arg(long, env = "BENCHCLUSTER_LOG_LEVEL")]
    log_level: Option<String>,
    /// Compete for a Lease and reconcile only while holding it (run two replicas).
    #[arg(long, env = "BENCHCLUSTER_LEADER_ELECTION")]
    leader_election: bool,
    /// Namespace of the leader Lease [default: the client's namespace, in a Pod its own].
    #[arg(long, env = "BENCHCLUSTER_LEASE_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Name of the leader Lease.
    #[arg(long, env = "BENCHCLUSTER_LEASE_NAME", default_value = leader::DEFAULT_LEASE_NAME)]
    lease_name: String,
    /// SSH jump host (`user@host`) through which guests are reached, when the controller
    /// does not run on the hypervisor.
    #[arg(long, env = "BENCHCLUSTER_SSH_JUMP_HOST")]
    ssh_jump_host: Option<String>,
    /// Directory for the controller's own state (per-VM SSH host keys, known_hosts).
    #[arg(
        long,
        env = "BENCHCLUSTER_STATE_DIR",
        default_value = "/var/lib/benchcluster"
    )]
    state_dir: PathBuf,
    /// Steps of different nodes of one cluster run at once.
    #[arg(long, env = "BENCHCLUSTER_MAX_PARALLEL_STEPS", default_value_t = Settings::default().max_parallel_steps)]
    max_parallel_steps: usize,
    /// Seconds a running VM may go without a DHCP lease before its status says so.
    #[arg(long, env = "BENCHCLUSTER_DHCP_TIMEOUT_SECONDS", default_value_t = Settings::default().dhcp_timeout.as_secs())]
    dhcp_timeout_seconds: u64,
    /// The former name of `--dhcp-timeout-seconds` (it read as the leader Lease's),
    /// still accepted with a warning; giving both is an error.
    #[arg(
        long,
        env = "BENCHCLUSTER_LEASE_TIMEOUT_SECONDS",
        hide = true,
        conflicts_with = "dhcp_timeout_seconds"
    )]
    lease_timeout_seconds: Option<u64>,
    /// Seconds `kubeadm init` or `kubeadm join` may take (raise it for software-emulated
    /// guests, where `kubeadm init` alone takes minutes).
    #[arg(long, env = "BENCHCLUSTER_KUBEADM_TIMEOUT_SECONDS", default_value_t = SshConfig::default().kubeadm_timeout.as_secs())]
    kubeadm_timeout_seconds: u64,
    /// Seconds any other command over SSH may take (probes, token minting, resets).
    #[arg(long, env = "BENCHCLUSTER_SSH_COMMAND_TIMEOUT_SECONDS", default_value_t = SshConfig::default().command_timeout.as_secs())]
    ssh_command_timeout_seconds: u64,
    /// vCPUs the host's domains may have per host CPU. A cluster whose nodes' vCPUs,
    /// with those of the other domains on the host, add up to more than the host's CPUs
    /// times this is Stalled before any VM is created.
    #[arg(long, env = "BENCHCLUSTER_CPU_OVERCOMMIT", default_value_t = Settings::default().cpu_overcommit, value_parser = positive_ratio)]
    cpu_overcommit: f64,
    /// Memory the host's domains may have per byte of host memory, likewise (above 1 only
    /// where guests leave memory untouched, or with swap).
    #[arg(long, env = "BENCHCLUSTER_MEMORY_OVERCOMMIT", default_value_t = Settings::default().memory_overcommit, value_parser = positive_ratio)]
    memory_overcommit: f64,
}

/// An overcommit ratio: a finite number above 0.
fn positive_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if ratio.is_finite() && ratio > 0.0 => Ok(ratio),
        _ => Err(format!("{text:?} is not a ratio above 0, for example 1.5")),
    }
}

impl Args {
    /// `--dhcp-timeout-seconds`, or the deprecated `--lease-timeout-seconds` when that
    /// was given instead (`true`: warn about it).
    fn dhcp_timeout(&self) -> (Duration, bool) {
        match self.lease_timeout_seconds {
            Some(seconds) => (Duration::from_secs(seconds), true),
            None => (Duration::from_secs(self.dhcp_timeout_seconds), false),
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = telemetry::init(args.log_format, args.log_level.as_deref()) {
        eprintln!("benchcluster-controller: {:#}", anyhow::Error::new(e));
        return ExitCode::from(2);
    }
    if args.dhcp_timeout().1 {
        warn!("--lease-timeout-seconds is deprecated; use --dhcp-timeout-seconds");
    }
    match run(args).await {
        Ok(Stopped::Shutdown) => {
            info!("stopped");
            ExitCode::SUCCESS
        }
        Ok(Stopped::LeadershipLost) => {
            error!("leadership lost: exiting to restart as a follower");
            ExitCode::from(1)
        }
        Err(e) => {
            error!(error = format!("{e:#}"), "cannot run");
            ExitCode::from(1)
        }
    }
}

async fn run(args: Args) -> anyhow::Result<Stopped> {
    let (dhcp_timeout, _) = args.dhcp_timeout();
    let mut libvirt_config = LibvirtConfig::for_uri(&args.libvirt_uri);
    if let Some(pool) = args.image_pool {
        libvirt_config.image_pool = pool;
    }
    if let Some(pool) = args.node_pool {
        libvirt_config.node_pool = pool;
    }
    if let Some(domain_type) = args.domain_type {
        libvirt_config.domain_type = domain_type;
    }
    info!(uri = %libvirt_config.uri, image_pool = %libvirt_config.image_pool,
          node_pool = %libvirt_config.node_pool, "libvirt");
    let libvirt = Libvirt::new(libvirt_config);
    let guest = SshGuest::new(SshConfig {
        state_dir: args.state_dir,
        jump_host: args.ssh_jump_host,
        kubeadm_timeout: Duration::from_secs(args.kubeadm_timeout_seconds),
        command_timeout: Duration::from_secs(args.ssh_command_timeout_seconds),
        ..SshConfig::default()
    });
    let client = kube_client()
        .await
        .context("cannot build a Kubernetes client (in-cluster or kubeconfig)")?;
    let settings = Settings {
        max_parallel_steps: args.max_parallel_steps.max(1),
        dhcp_timeout,
        cpu_overcommit: args.cpu_overcommit,
        memory_overcommit: args.memory_overcommit,
        ..Settings::default()
    };
    let metrics = Arc::new(Metrics::new());
    let counted = Arc::clone(&metrics);
    let ctx = Arc::new(
        Context::new(
            client.clone(),
            Metered::new(libvirt.clone(), move |operation, kind| {
                counted.libvirt_call(operation, kind)
            }),
            guest,
            settings,
        )
        .with_metrics(Arc::clone(&metrics)),
    );

    let elector = if args.leader_election {
        let namespace = args
            .lease_namespace
            .unwrap_or_else(|| client.default_namespace().to_owned());
        let config = LeaseConfig::new(namespace, args.lease_name);
        Some(Elector::start(client.clone(), config, Arc::clone(&metrics)).await?)
    } else {
        None
    };
    let status = elector.as_ref().map(Elector::status);
    let synced_ctx = Arc::clone(&ctx);
    let readiness = Readiness::new()
        .with("crd", http::crd_check(client))
        // A follower does not watch: it is ready without, so a rolling update can
        // bring it up before the leader goes.
        .with(
            "watch",
            http::flag_check("the BenchCluster watch has not synced", move || {
                synced_ctx.watch_synced() || status.as_ref().is_some_and(|s| !s.is_leader())
            }),
        )
        .with("libvirt", http::libvirt_check(libvirt.clone()));
    let listener = tokio::net::TcpListener::bind(args.http_addr)
        .await
        .with_context(|| format!("cannot listen on {}", args.http_addr))?;
    let (http_stop, http_stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(http::serve(listener, metrics, readiness, async {
        let _ = http_stopped.await;
    }));

    let stopped =
        leader::run_controller(Arc::clone(&ctx), args.namespace, elector, shutdown_signal()).await;

    let _ = http_stop.send(());
    let _ = server.await;
    if let Err(e) = libvirt.disconnect().await {
        warn!(error = %e, "closing the libvirt connection");
    }
    Ok(stopped?)
}

/// The client from the in-cluster config or the kubeconfig, with [`ApiRetry`] in place
/// of kube's default retry (which retries every method up to 15 times, with delays
/// growing to 1000 s).
async fn kube_client() -> Result<kube::Client, kube::Error> {
    use tower::ServiceBuilder;
    use tower::buffer::BufferLayer;
    use tower::retry::RetryLayer;

    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.default_retry = false;
    let retry = ServiceBuilder::new()
        .layer(RetryLayer::new(ApiRetry::new()))
        // The retry layer clones the service it wraps; kube's stack is boxed, not Clone.
        .layer(BufferLayer::new(1024))
        .into_inner();
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&retry)
        .build())
}

/// kube's [`RetryPolicy`] (429, 503 and 504; jittered exponential backoff from
/// [`ApiRetry::MIN_DELAY`] to [`ApiRetry::MAX_DELAY`], at most [`ApiRetry::MAX_RETRIES`]
/// retries, a longer `Retry-After` of the server honoured), limited to requests that
/// may safely run twice: a 429 is retried for any method (the API server rejected the
/// request before running it), a 503 or 504 only for an idempotent one (GET, HEAD,
/// OPTIONS, PUT, DELETE, and a server-side apply or JSON merge PATCH), since a POST or
/// JSON patch that timed out may have been applied. Other failures are left to the
/// caller: the reconcile's own backoff, the watcher's, the lease manager's.
#[derive(Clone)]
struct ApiRetry(RetryPolicy);

impl ApiRetry {
    const MIN_DELAY: Duration = Duration::from_millis(500);
    const MAX_DELAY: Duration = Duration::from_secs(5);
    const MAX_RETRIES: u32 = 3;

    fn new() -> Self {
        match RetryPolicy::new(Self::MIN_DELAY, Self::MAX_DELAY, Self::MAX_RETRIES, true) {
            Ok(policy) => Self(policy),
            // MIN_DELAY <= MAX_DELAY, both finite: the only invalid settings are not ours.
            Err(_) => Self(RetryPolicy::default()),
        }
    }

    /// Whether the request may be sent again after a `status` kube's policy retries.
    fn may_resend(
        request: &::http::Request<kube::client::Body>,
        status: ::http::StatusCode,
    ) -> bool {
        use ::http::Method;
        if status == ::http::StatusCode::TOO_MANY_REQUESTS {
            return true;
        }
        match *request.method() {
            Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE => true,
            Method::PATCH => request
                .headers()
                .get(::http::header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|t| {
                    t.starts_with("application/apply-patch")
                        || t.starts_with("application/merge-patch")
                }),
            _ => false,
        }
    }
}

impl<Res>
    tower::retry::Policy<
        ::http::Request<kube::client::Body>,
        ::http::Response<Res>,
        tower::BoxError,
    > for ApiRetry
{
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        request: &mut ::http::Request<kube::client::Body>,
        result: &mut Result<::http::Response<Res>, tower::BoxError>,
    ) -> Option<Self::Future> {
        match result {
            Ok(response) if Self::may_resend(request, response.status()) => {
                self.0.retry(request, result)
            }
            _ => None,
        }
    }

    fn clone_request(
        &mut self,
        request: &::http::Request<kube::client::Body>,
    ) -> Option<::http::Request<kube::client::Body>> {
        tower::retry::Policy::<_, ::http::Response<Res>, tower::BoxError>::clone_request(
            &mut self.0,
            request,
        )
    }
}

/// Resolves on the first SIGTERM or SIGINT; a second one exits at once.
async fn shutdown_signal() {
    wait_for_signal().await;
    info!("shutting down: letting in-flight reconciles finish (signal again to exit now)");
    tokio::spawn(async {
        wait_for_signal().await;
        warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        }
        _ => {
            // Without handlers the default disposition kills the process anyway.
            warn!("cannot install signal handlers");
            std::future::pending::<()>().await;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    fn parse(flags: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(
            std::iter::once("benchcluster-controller").chain(flags.iter().copied()),
        )
    }

    #[test]
    fn the_dhcp_timeout_has_a_new_name_and_the_old_one_still_works() {
        let default = parse(&[]).unwrap();
        assert_eq!(
            default.dhcp_timeout(),
            (Settings::default().dhcp_timeout, false)
        );
        let new = parse(&["--dhcp-timeout-seconds=42"]).unwrap();
        assert_eq!(new.dhcp_timeout(), (Duration::from_secs(42), false));
        let old = parse(&["--lease-timeout-seconds", "7"]).unwrap();
        assert_eq!(
            old.dhcp_timeout(),
            (Duration::from_secs(7), true),
            "deprecated: warned"
        );
        // The leader Lease's flags are not affected.
        let leader = parse(&["--lease-name=other", "--dhcp-timeout-seconds=1"]).unwrap();
        assert_eq!(leader.lease_name, "other");
        assert_eq!(leader.dhcp_timeout(), (Duration::from_secs(1), false));
    }

    #[test]
    fn giving_both_dhcp_timeout_flags_is_an_error_naming_both() {
        let error = parse(&["--lease-timeout-seconds=7", "--dhcp-timeout-seconds=42"])
            .map(drop)
            .unwrap_err();
        assert_eq!(error.kind(), clap::error::ErrorKind::ArgumentConflict);
        let message = error.to_string();
        assert!(
            message.contains("--lease-timeout-seconds")
                && message.contains("--dhcp-timeout-seconds"),
            "{message}"
        );
    }

    /// What ApiRetry does after `status` for `method` (with this Content-Type):
    /// `Some(delay)` for a retry.
    fn retried(
        policy: &mut ApiRetry,
        method: ::http::Method,
        content_type: Option<&str>,
        status: u16,
    ) -> Option<Duration> {
        use tower::retry::Policy as _;
        let mut request = ::http::Request::builder()
            .method(method)
            .uri("/api/v1/namespaces");
        if let Some(content_type) = content_type {
            request = request.header(::http::header::CONTENT_TYPE, content_type);
        }
        let mut request = request
            .body(kube::client::Body::from(b"{}".to_vec()))
            .unwrap();
        assert!(
            tower::retry::Policy::<_, ::http::Response<()>, tower::BoxError>::clone_request(
                policy, &request
            )
            .is_some(),
            "the body can be sent again"
        );
        let mut result: Result<_, tower::BoxError> =
            Ok(::http::Response::builder().status(status).body(()).unwrap());
        policy
            .retry(&mut request, &mut result)
            .map(|sleep| sleep.deadline() - tokio::time::Instant::now())
    }

    #[tokio::test(start_paused = true)]
    async fn the_api_retry_is_bounded_jittered_and_only_for_requests_that_may_run_twice() {
        use ::http::Method;
        let apply = Some("application/apply-patch+yaml");
        let json_patch = Some("application/json-patch+json");
        for (method, content_type) in [
            (Method::GET, None),
            (Method::PUT, None),
            (Method::DELETE, None),
            (Method::PATCH, apply),
            (Method::PATCH, Some("application/merge-patch+json")),
        ] {
            for status in [503, 504] {
                assert!(
                    retried(&mut ApiRetry::new(), method.clone(), content_type, status).is_some(),
                    "{method} {content_type:?} {status}"
                );
            }
        }
        for (method, content_type) in [(Method::POST, None), (Method::PATCH, json_patch)] {
            for status in [503, 504] {
                assert_eq!(
                    retried(&mut ApiRetry::new(), method.clone(), content_type, status),
                    None,
                    "{method} {content_type:?} {status}"
                );
            }
            // The server refused it before running it.
            assert!(retried(&mut ApiRetry::new(), method.clone(), content_type, 429).is_some());
        }
        for status in [200, 201, 400, 404, 409, 500] {
            assert_eq!(
                retried(&mut ApiRetry::new(), Method::GET, None, status),
                None,
                "{status}"
            );
        }

        // One request's retries: at most MAX_RETRIES, each delay within the doubling
        // base plus up to twice its jitter, never over MAX_DELAY.
        let mut policy = ApiRetry::new();
        let mut base = ApiRetry::MIN_DELAY;
        for attempt in 0..ApiRetry::MAX_RETRIES {
            let delay = retried(&mut policy, Method::GET, None, 503)
                .unwrap_or_else(|| panic!("retry {attempt} refused"));
            assert!(
                delay >= base && delay <= (base * 3).min(ApiRetry::MAX_DELAY),
                "{delay:?} for base {base:?}"
            );
            base = (base * 2).min(ApiRetry::MAX_DELAY);
        }
        assert_eq!(
            retried(&mut policy, Method::GET, None, 503),
            None,
            "bounded"
        );
    }

    #[test]
    fn the_old_name_is_hidden_from_help() {
        use clap::CommandFactory as _;
        let help = Args::command().render_long_help().to_string();
        assert!(help.contains("--dhcp-timeout-seconds"), "{help}");
        assert!(!help.contains("--lease-timeout-seconds"), "{help}");
        Args::command().debug_assert();
    }
}
