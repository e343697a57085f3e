//! Leader election on a `coordination.k8s.io/v1` Lease, so two replicas can run and only
//! one reconciles.
//!
//! The protocol (acquire, renew, release, take over an expired Lease) is
//! `kube-lease-manager`'s. It does not report its renewals and keeps claiming the
//! leadership while the API server is unreachable, so on top of it one watch on the
//! Lease (no polling) does two things:
//!
//! - while following, a released (or deleted) Lease restarts the manager at once (the
//!   crate itself would only look again at the old expiry);
//! - while leading, a local renew deadline: each renewal of ours that the watch delivers
//!   (pushed by the API server as the write lands) moves the deadline to
//!   `duration - renew_every` later on this process's monotonic clock; when it passes,
//!   or when the Lease names another holder, the leadership is lost. So a partitioned
//!   leader stops before a follower may take over (a follower waits the full
//!   `duration` after the last renewal).
//!
//! A replica that loses the leadership stops reconciling and [`run_controller`] returns
//! [`Stopped::LeadershipLost`]: the binary then exits non-zero and restarts as a follower.

use std::future::Future;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt as _;
use futures::stream::BoxStream;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use kube::{Api, Client};
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseManagerError, LeaseParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::guest::Guest;
use crate::hypervisor::Hypervisor;
use crate::metrics::Metrics;
use crate::reconcile;
use crate::reconcile::context::Context;

/// Default name of the Lease.
pub const DEFAULT_LEASE_NAME: &str = "benchcluster-controller";
/// How long a Lease stays valid after its last renewal: the bound on a takeover after
/// the leader dies.
pub const LEASE_DURATION: Duration = Duration::from_secs(15);
/// How often the leader renews.
pub const RENEW_INTERVAL: Duration = Duration::from_secs(5);
/// How long a stepping-down leader waits for its release of the Lease to land.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the Lease is and how it is held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity in `spec.holderIdentity`; unique per process.
    pub identity: String,
    /// Whole seconds, at least 2.
    pub duration: Duration,
    /// Whole seconds, at least 1 and less than `duration`.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// [`LEASE_DURATION`] and [`RENEW_INTERVAL`], with a fresh [`default_identity`].
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: default_identity(),
            duration: LEASE_DURATION,
            renew_every: RENEW_INTERVAL,
        }
    }

    /// The window after which a leader that saw none of its renewals steps down: the
    /// lease duration less one renew interval as the margin.
    pub fn renew_deadline(&self) -> Duration {
        self.duration.saturating_sub(self.renew_every)
    }

    fn seconds(&self) -> Result<(u64, u64), LeaderError> {
        let duration = self.duration.as_secs();
        let renew = self.renew_every.as_secs();
        if self.duration.subsec_nanos() != 0 || self.renew_every.subsec_nanos() != 0 {
            return Err(LeaderError::Config("lease times are whole seconds"));
        }
        if renew == 0 || renew >= duration {
            return Err(LeaderError::Config(
                "the renew interval must be at least 1 s and shorter than the lease",
            ));
        }
        Ok((duration, renew))
    }
}

/// `POD_NAME` (or the host name) and a random suffix: a restarted container gets a new
/// identity, so it never mistakes its predecessor's Lease for its own.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| DEFAULT_LEASE_NAME.to_owned());
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
        hasher.write_u128(now.as_nanos());
    }
    format!("{base}-{:08x}", hasher.finish() as u32)
}

#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error("invalid leader election settings: {0}")]
    Config(&'static str),
    #[error("Lease {namespace}/{name}")]
    Lease {
        namespace: String,
        name: String,
        #[source]
        source: LeaseManagerError,
    },
    #[error("leader election stopped before this replica became leader")]
    Stopped,
}

/// Whether this replica leads, as seen by the elector; cheap to clone.
#[derive(Debug, Clone)]
pub struct LeaderStatus {
    receiver: watch::Receiver<bool>,
    /// Keeps the channel of [`LeaderStatus::always`] open: a closed channel means "the
    /// elector stopped".
    _sender: Option<Arc<watch::Sender<bool>>>,
}

impl LeaderStatus {
    /// A status that always leads (leader election disabled).
    pub fn always() -> Self {
        let (sender, receiver) = watch::channel(true);
        Self {
            receiver,
            _sender: Some(Arc::new(sender)),
        }
    }

    fn of(receiver: watch::Receiver<bool>) -> Self {
        Self {
            receiver,
            _sender: None,
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.receiver.borrow()
    }

    /// Resolves once this replica leads; `Err` if the elector stopped first.
    pub async fn leading(&mut self) -> Result<(), LeaderError> {
        self.receiver
            .wait_for(|leading| *leading)
            .await
            .map(drop)
            .map_err(|_| LeaderError::Stopped)
    }

    /// Resolves when a leadership, once gained, is lost, or when the elector stops.
    pub fn lost(&self) -> impl Future<Output = ()> + Send + Sync + 'static {
        let mut receiver = self.receiver.clone();
        let keep = self._sender.clone();
        async move {
            let _keep = keep;
            if receiver.wait_for(|leading| *leading).await.is_ok() {
                let _ = receiver.wait_for(|leading| !*leading).await;
            }
        }
    }
}

/// One replica's participation in the election.
///
/// Dropping it models a crash: the Lease is left to expire. [`Elector::step_down`]
/// releases it, so a follower takes over at once.
pub struct Elector {
    config: LeaseConfig,
    status: LeaderStatus,
    step_down: Option<tokio::sync::oneshot::Sender<()>>,
    /// Runs the lease manager, follows, guards; aborted on drop.
    monitor: Option<JoinHandle<()>>,
}

impl Elector {
    /// Creates the Lease if needed and starts competing for it.
    pub async fn start(
        client: Client,
        config: LeaseConfig,
        metrics: Arc<Metrics>,
    ) -> Result<Self, LeaderError> {
        let (duration, renew) = config.seconds()?;
        // The crate renews `grace` seconds before expiry: every `renew` seconds.
        let params = LeaseParams::new(config.identity.clone(), duration, duration - renew)
            .with_field_manager(format!(
                "{}-{}",
                crate::reconcile::context::FIELD_MANAGER,
                config.identity
            ));
        let competition = Competition {
            client,
            config: config.clone(),
            params,
        };
        // The first manager is made here, so RBAC or API trouble fails the start.
        let manager = competition.manager().await?;
        let (leading, status) = watch::channel(false);
        let (step_down, stepped_down) = tokio::sync::oneshot::channel();
        metrics.set_leader(false);
        info!(identity = %config.identity, lease = %format!("{}/{}", config.namespace, config.name), "competing for the leader Lease");
        let monitor = tokio::spawn(monitor(
            competition,
            manager,
            leading,
            stepped_down,
            metrics,
        ));
        Ok(Self {
            config,
            status: LeaderStatus::of(status),
            step_down: Some(step_down),
            monitor: Some(monitor),
        })
    }

    pub fn identity(&self) -> &str {
        &self.config.identity
    }

    pub fn status(&self) -> LeaderStatus {
        self.status.clone()
    }

    /// Leaves the election and releases the Lease if held, so a follower takes over
    /// without waiting for it to expire.
    pub async fn step_down(mut self) {
        if let Some(step_down) = self.step_down.take() {
            let _ = step_down.send(());
        }
        if let Some(monitor) = self.monitor.take()
            && tokio::time::timeout(RELEASE_TIMEOUT, monitor)
                .await
                .is_err()
        {
            warn!("releasing the leader Lease timed out");
        }
    }
}

impl Drop for Elector {
    fn drop(&mut self) {
        if let Some(monitor) = self.monitor.take() {
            // Drops its Manager, which aborts the crate's task before closing its
            // channel: nothing is released, as after a crash.
            monitor.abort();
        }
    }
}

/// What is needed to (re)start a lease manager.
struct Competition {
    client: Client,
    config: LeaseConfig,
    params: LeaseParams,
}

impl Competition {
    async fn manager(&self) -> Result<Manager, LeaderError> {
        let manager = LeaseManager::new(
            self.client.clone(),
            &self.config.name,
            &self.config.namespace,
            self.params.clone(),
            LeaseCreateMode::AutoCreate,
        )
        .await
        .map_err(|source| LeaderError::Lease {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            source,
        })?;
        let (state, task) = manager.watch().await;
        Ok(Manager {
            state,
            task: Some(task),
        })
    }

    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), &self.config.namespace)
    }
}

/// A running kube-lease-manager: its task acquires and renews the Lease, and releases
/// it when `state` (its channel) closes. Dropped, it aborts the task first: no release.
struct Manager {
    state: watch::Receiver<bool>,
    task: Option<JoinHandle<kube_lease_manager::Result<LeaseManager>>>,
}

impl Manager {
    /// Closes the channel: the task releases the Lease if it holds it, then ends.
    fn release(mut self) -> Option<JoinHandle<kube_lease_manager::Result<LeaseManager>>> {
        self.task.take()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        // Runs before `state` is dropped (fields drop after this), so the task is
        // cancelled before it could see its channel close and release.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The Lease as the API server pushes it: `Some` when created or changed, `None` when
/// deleted (or absent at a (re)list); errors (the watch restarting with backoff) too.
type LeaseEvents = BoxStream<'static, Result<Option<Lease>, watcher::Error>>;

/// The watch on the one Lease, restarted with kube's default backoff after an error.
fn lease_events(api: Api<Lease>, name: &str) -> LeaseEvents {
    watcher::watch_object(api, name).default_backoff().boxed()
}

/// Whether nobody holds `lease` (`None`: deleted; a new manager creates it again).
fn released(lease: Option<&Lease>) -> bool {
    lease.is_none_or(|l| l.spec.as_ref().is_none_or(|s| s.holder_identity.is_none()))
}

/// The local renew deadline of a leader, fed with the Lease as the watch sees it.
#[derive(Debug)]
struct RenewDeadline {
    identity: String,
    window: Duration,
    /// When the last renewal of ours was seen (or the leadership began).
    renewed: Instant,
    last_renewal: Option<MicroTime>,
    /// Whether the watch has shown this replica as the holder yet. Until it has, an
    /// event naming someone else is older than our acquisition (the watch delivers one
    /// object's changes in order), not a takeover.
    seen_self: bool,
}

impl RenewDeadline {
    fn new(identity: &str, window: Duration, now: Instant) -> Self {
        Self {
            identity: identity.to_owned(),
            window,
            renewed: now,
            last_renewal: None,
            seen_self: false,
        }
    }

    fn deadline(&self) -> Instant {
        self.renewed + self.window
    }

    /// Takes in one state of the Lease seen at `now`; `Err(reason)` when it shows the
    /// leadership lost.
    fn observe(&mut self, lease: Option<&Lease>, now: Instant) -> Result<(), String> {
        let Some(spec) = lease.map(|l| l.spec.clone().unwrap_or_default()) else {
            return if self.seen_self {
                Err("the Lease was deleted".to_owned())
            } else {
                Ok(())
            };
        };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return if self.seen_self {
                Err(format!(
                    "the Lease names holder {:?}",
                    spec.holder_identity.unwrap_or_default()
                ))
            } else {
                Ok(())
            };
        }
        self.seen_self = true;
        if spec.renew_time != self.last_renewal {
            self.renewed = now;
            self.last_renewal = spec.renew_time;
        }
        Ok(())
    }
}

/// Publishes the manager's view as `leading`. While following, restarts the manager
/// when the watch shows the Lease released; while leading, keeps the renew deadline.
async fn monitor(
    competition: Competition,
    mut manager: Manager,
    leading: watch::Sender<bool>,
    mut stepped_down: tokio::sync::oneshot::Receiver<()>,
    metrics: Arc<Metrics>,
) {
    let config = &competition.config;
    let mut events = lease_events(competition.api(), &config.name);
    // The Lease as last seen while following: the leader's guard starts from it, since
    // the watch may have shown our acquisition before the manager reported it.
    let mut latest: Option<Option<Lease>> = None;
    loop {
        if *manager.state.borrow_and_update() {
            break;
        }
        tokio::select! {
            changed = manager.state.changed() => {
                if changed.is_err() {
                    warn!("the leader election task stopped");
                    return;
                }
            }
            asked = &mut stepped_down => {
                // A dropped Elector (Err) is a crash: no release.
                if asked.is_ok() {
                    release(manager).await;
                }
                return;
            }
            Some(event) = events.next() => match event {
                Ok(lease) => {
                    let released = released(lease.as_ref());
                    latest = Some(lease);
                    if released && !*manager.state.borrow() {
                        debug!("the Lease was released: competing for it now");
                        match competition.manager().await {
                            Ok(fresh) => manager = fresh,
                            Err(error) => debug!(error = %crate::util::chain(&error), "cannot restart the lease manager"),
                        }
                    }
                }
                Err(error) => debug!(%error, "watching the leader Lease"),
            },
        }
    }
    info!(identity = %config.identity, "became leader");
    metrics.set_leader(true);
    let _ = leading.send(true);

    let mut guard = RenewDeadline::new(&config.identity, config.renew_deadline(), Instant::now());
    if let Some(lease) = latest {
        // Never a loss: nothing named us before, so whatever it names is older.
        let _ = guard.observe(lease.as_ref(), Instant::now());
    }
    let expiry = tokio::time::sleep_until(guard.deadline());
    futures::pin_mut!(expiry);
    let reason = loop {
        tokio::select! {
            changed = manager.state.changed() => {
                if changed.is_err() {
                    break "the leader election task stopped".to_owned();
                }
                if !*manager.state.borrow_and_update() {
                    break "the Lease was taken over".to_owned();
                }
            }
            asked = &mut stepped_down => {
                metrics.set_leader(false);
                if asked.is_ok() {
                    release(manager).await;
                }
                return;
            }
            Some(event) = events.next() => match event {
                Ok(lease) => {
                    if let Err(reason) = guard.observe(lease.as_ref(), Instant::now()) {
                        break reason;
                    }
                    expiry.as_mut().reset(guard.deadline());
                }
                Err(error) => debug!(%error, "watching the leader Lease"),
            },
            () = &mut expiry => {
                break format!("no renewal seen for {}s", config.renew_deadline().as_secs());
            }
        }
    };
    warn!(identity = %config.identity, %reason, "leadership lost");
    metrics.set_leader(false);
    let _ = leading.send(false);
    // Let the manager release the Lease if it still holds it (no renewal seen, API
    // trouble); it does nothing when another holder is named.
    drop(manager.release());
}

/// Closes the manager's channel and waits for it to release the Lease.
async fn release(manager: Manager) {
    let Some(task) = manager.release() else {
        return;
    };
    match tokio::time::timeout(RELEASE_TIMEOUT, task).await {
        Ok(Ok(Ok(_))) => info!("released the leader Lease"),
        Ok(Ok(Err(error))) => {
            warn!(error = %crate::util::chain(&error), "cannot release the leader Lease")
        }
        Ok(Err(error)) => warn!(%error, "the leader election task failed"),
        Err(_) => warn!("releasing the leader Lease timed out"),
    }
}

/// Why [`run_controller`] returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// `shutdown` resolved (SIGTERM): in-flight reconciles finished, the Lease was
    /// released. Exit 0.
    Shutdown,
    /// Another replica holds the Lease now: reconciling stopped. Exit non-zero, to
    /// restart as a follower.
    LeadershipLost,
}

/// Runs the controller: without an elector at once, with one as soon as it leads; until
/// `shutdown` resolves or the leadership is lost.
pub async fn run_controller<H: Hypervisor, G: Guest>(
    ctx: Arc<Context<H, G>>,
    namespace: Option<String>,
    elector: Option<Elector>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Stopped, LeaderError> {
    let mut status = match &elector {
        Some(elector) => elector.status(),
        None => {
            ctx.metrics.set_leader(true);
            LeaderStatus::always()
        }
    };
    let (reason_tx, mut reason_rx) = watch::channel(None::<Stopped>);
    let lost = status.lost();
    // One task decides why the controller stops, so the reason is known afterwards.
    let decider = tokio::spawn(async move {
        futures::pin_mut!(shutdown, lost);
        let reason = match futures::future::select(shutdown, lost).await {
            futures::future::Either::Left(_) => Stopped::Shutdown,
            futures::future::Either::Right(_) => Stopped::LeadershipLost,
        };
        let _ = reason_tx.send(Some(reason));
    });

    let leading = async {
        if elector.is_some() {
            info!("waiting to become leader");
        }
        status.leading().await
    };
    let mut reason_wait = reason_rx.clone();
    let stop_requested = async move {
        let _ = reason_wait.wait_for(Option::is_some).await;
    };
    tokio::select! {
        result = leading => if let Err(error) = result {
            decider.abort();
            return Err(error);
        },
        () = stop_requested => {
            decider.abort();
            let reason = (*reason_rx.borrow()).unwrap_or(Stopped::Shutdown);
            if let Some(elector) = elector {
                elector.step_down().await;
            }
            return match reason {
                Stopped::Shutdown => Ok(Stopped::Shutdown),
                // Lost before it was ever gained: the elector itself stopped.
                Stopped::LeadershipLost => Err(LeaderError::Stopped),
            };
        }
    }

    let mut stop_rx = reason_rx.clone();
    let stop = async move {
        let _ = stop_rx.wait_for(Option::is_some).await;
    };
    reconcile::run(Arc::clone(&ctx), namespace.as_deref(), stop).await;
    decider.abort();
    let reason = (*reason_rx.borrow_and_update()).unwrap_or(Stopped::Shutdown);
    if let Some(elector) = elector {
        match reason {
            Stopped::Shutdown => elector.step_down().await,
            Stopped::LeadershipLost => drop(elector),
        }
    }
    ctx.metrics.set_leader(false);
    Ok(reason)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn lease_timings_are_checked_before_the_crate_sees_them() {
        let mut config = LeaseConfig::new("ns", "lease");
        assert_eq!(config.seconds().unwrap(), (15, 5));
        assert_eq!(config.renew_deadline(), Duration::from_secs(10));
        config.renew_every = config.duration;
        assert!(config.seconds().is_err(), "renewing as late as expiry");
        config.renew_every = Duration::ZERO;
        assert!(config.seconds().is_err());
        config.renew_every = Duration::from_millis(1500);
        assert!(config.seconds().is_err(), "the crate counts whole seconds");
    }

    fn lease(holder: Option<&str>, renewed_at_second: i64) -> Lease {
        let at = k8s_openapi::jiff::Timestamp::from_second(renewed_at_second).unwrap();
        Lease {
            spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                holder_identity: holder.map(str::to_owned),
                renew_time: Some(MicroTime(at)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn each_renewal_seen_moves_the_deadline_and_only_a_renewal_does() {
        let start = Instant::now();
        let window = Duration::from_secs(10);
        let mut guard = RenewDeadline::new("me", window, start);
        assert_eq!(
            guard.deadline(),
            start + window,
            "counted from becoming leader"
        );
        let later = start + Duration::from_secs(4);
        guard.observe(Some(&lease(Some("me"), 100)), later).unwrap();
        assert_eq!(guard.deadline(), later + window);
        // The same renewal again (another field changed): no renewal, no new deadline.
        guard
            .observe(
                Some(&lease(Some("me"), 100)),
                later + Duration::from_secs(3),
            )
            .unwrap();
        assert_eq!(guard.deadline(), later + window);
        let again = later + Duration::from_secs(5);
        guard.observe(Some(&lease(Some("me"), 105)), again).unwrap();
        assert_eq!(guard.deadline(), again + window);
    }

    #[tokio::test(start_paused = true)]
    async fn another_holder_or_a_deletion_ends_the_leadership_once_ours_was_seen() {
        let now = Instant::now();
        let window = Duration::from_secs(10);
        // Events from before our acquisition reached the watch: not a takeover.
        let mut guard = RenewDeadline::new("me", window, now);
        guard.observe(Some(&lease(None, 1)), now).unwrap();
        guard.observe(Some(&lease(Some("old"), 2)), now).unwrap();
        guard.observe(None, now).unwrap();
        assert_eq!(guard.deadline(), now + window, "none of them a renewal");
        guard.observe(Some(&lease(Some("me"), 3)), now).unwrap();
        let lost = guard
            .observe(Some(&lease(Some("intruder"), 4)), now)
            .unwrap_err();
        assert!(lost.contains("intruder"), "{lost}");

        let mut guard = RenewDeadline::new("me", window, now);
        guard.observe(Some(&lease(Some("me"), 3)), now).unwrap();
        assert!(
            guard.observe(Some(&lease(None, 4)), now).is_err(),
            "released by someone"
        );
        let mut guard = RenewDeadline::new("me", window, now);
        guard.observe(Some(&lease(Some("me"), 3)), now).unwrap();
        assert_eq!(
            guard.observe(None, now).unwrap_err(),
            "the Lease was deleted"
        );
    }

    #[test]
    fn a_lease_without_holder_or_gone_is_released() {
        assert!(released(None));
        assert!(released(Some(&Lease::default())));
        assert!(released(Some(&lease(None, 1))));
        assert!(!released(Some(&lease(Some("a"), 1))));
    }

    #[test]
    fn identities_differ_between_replicas() {
        assert_ne!(default_identity(), default_identity());
    }

    #[tokio::test(start_paused = true)]
    async fn without_election_the_leadership_is_never_lost() {
        let mut status = LeaderStatus::always();
        status.leading().await.unwrap();
        let lost = tokio::time::timeout(Duration::from_secs(3600), status.lost()).await;
        assert!(lost.is_err(), "lost() resolved");
    }

    #[tokio::test(start_paused = true)]
    async fn loss_is_reported_only_after_leading() {
        let (sender, receiver) = watch::channel(false);
        let status = LeaderStatus::of(receiver);
        let lost = tokio::spawn(status.lost());
        tokio::task::yield_now().await;
        assert!(!lost.is_finished(), "not leading yet is not a loss");
        sender.send(true).unwrap();
        tokio::task::yield_now().await;
        assert!(!lost.is_finished());
        sender.send(false).unwrap();
        tokio::time::timeout(Duration::from_secs(1), lost)
            .await
            .unwrap()
            .unwrap();
    }
}
