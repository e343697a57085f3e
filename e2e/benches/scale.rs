//! Benchmarks of the controller loop on a real API server and libvirt's test driver.
//! Not tests: they print figures, measured side by side in one run.
//!
//! `cargo xtask bench` (or `cargo bench -p benchcluster-e2e --bench scale`) prints:
//! - the parallel-provisioning ratio: time to Ready of 1+32 over 1+1 with a fixed
//!   latency injected in every hypervisor and guest step, the controller in this process,
//!   the medians of five alternated rounds (target: under 1.15, workers provision and
//!   join in parallel);
//! - one 1+0 and one 1+3 lifecycle (create, Ready, a few passes at rest): status patches
//!   counted by the controller (`benchcluster_status_patches_total`) and by the API
//!   server (`apiserver_request_total`, verb APPLY or PATCH, subresource status), against
//!   the real transitions a watch saw (distinct consecutive statuses, conditions'
//!   `lastTransitionTime` ignored) (target: no more patches than transitions);
//! - at 10, 100 and N BenchClusters (1+0 each; N = `BENCH_CLUSTERS`, default 1000): the
//!   time from the first create until all are Ready (target at 1000: under 60 s; the wait
//!   is capped by `BENCH_READY_DEADLINE_SECONDS`, default 600, and says how many were
//!   Ready then), the controller's resident memory (target: under 64 MiB) and CPU time,
//!   the API server's; status patches per cluster, counted twice, against the
//!   transitions; the API requests per cluster during convergence by verb and resource;
//!   and over a window at rest (`REST_RESYNCS` resync intervals of the controller, its
//!   resync shortened to `RESYNC`), API requests per minute (target: no write, and no
//!   GET or LIST: reads only from watches), libvirt calls per pass and per minute
//!   (target: flat in the number of clusters) and libvirt mutations (target: 0); and the
//!   Events by reason (a repeated one counted with its series).
//!
//! Every count is the controller's alone: from the lifecycles on, the controller runs as
//! a process of its own (`bench-controller`, the api tier's test bed in a process), one
//! per figure, watching its own namespace, so its `/metrics`, its `/proc` memory and CPU
//! and the API server's counters all belong to it (the bench's own creates are taken
//! out, and only requests on what the controller's RBAC grants it are counted, which
//! leaves out what the API server does by itself; the bench's one watch is counted as a
//! WATCH when it ends). libvirt calls come from the
//! controller's `benchcluster_libvirt_calls_total` (every call, reads included) and
//! print "n/a" in a build without it; mutations from `benchcluster_libvirt_mutations_total`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, anyhow, bail};
use benchcluster_controller::Settings;
use benchcluster_crd::BenchCluster;
use benchcluster_e2e::measure::{self, ApiRequests, Scrape, StatusWatch};
use benchcluster_e2e::testbed::{self, RunningController};
use benchcluster_e2e::{TestApiServer, create_namespace, wait};
use benchcluster_testkit::FakeGuest;
use futures::StreamExt;
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};
use tokio::io::{AsyncBufReadExt, BufReader};

const HYPERVISOR_STEP: Duration = Duration::from_millis(50);
const GUEST_STEP: Duration = Duration::from_millis(500);
/// The bench controller's resync interval (the production one is minutes): a converged
/// cluster is reconciled once per interval, so a window at rest sees passes.
const RESYNC: Duration = Duration::from_secs(10);
/// The lifecycles' resync interval: one cluster, so short is cheap.
const LIFECYCLE_RESYNC: Duration = Duration::from_secs(2);
/// The window at rest: this many resync intervals, and at least as many passes per
/// cluster.
const REST_RESYNCS: u32 = 3;
/// Scale points below `BENCH_CLUSTERS`.
const SCALE_POINTS: [usize; 2] = [10, 100];
/// Until the bench controller listens and is ready.
const START_DEADLINE: Duration = Duration::from_secs(60);

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let server = TestApiServer::start().await?;
    server.install_crd().await?;
    let client = server.client().await?;
    testbed::libvirt()?;

    parallel_provisioning(&client).await?;

    for workers in [0, 3] {
        lifecycle(&server, &client, workers).await?;
    }

    let clusters = env_number("BENCH_CLUSTERS", 1000);
    let deadline = Duration::from_secs(env_number("BENCH_READY_DEADLINE_SECONDS", 600) as u64);
    let mut points: Vec<usize> = SCALE_POINTS
        .into_iter()
        .filter(|n| *n < clusters)
        .chain([clusters])
        .collect();
    points.dedup();
    let mut rows = Vec::new();
    for count in points {
        rows.push(many_clusters(&server, &client, count, deadline).await?);
    }
    print_libvirt_table(&rows);
    Ok(())
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------------------------
// Parallel provisioning: the controller in this process, as before.

/// Time from create to Ready of one BenchCluster with `workers` workers.
async fn time_to_ready(client: &Client, workers: i32) -> Result<Duration> {
    let namespace = create_namespace(client, &format!("bench-par{workers}")).await?;
    testbed::create_ssh_secret(client, &namespace).await?;
    let mut hypervisor = testbed::hypervisor();
    hypervisor.step_latency = HYPERVISOR_STEP;
    let settings = Settings {
        poll_interval: Duration::from_millis(100),
        ..testbed::fast_settings()
    };
    let controller = RunningController::start_with(
        client.clone(),
        Some(&namespace),
        hypervisor,
        FakeGuest::with_latency(GUEST_STEP),
        settings,
    );
    let api: Api<BenchCluster> = Api::namespaced(client.clone(), &namespace);
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &testbed::benchcluster(&namespace, "par", workers)?,
    )
    .await?;
    wait::until(
        "Ready",
        Duration::from_secs(300),
        Duration::from_millis(20),
        || async { anyhow::Ok(testbed::is_ready(&api.get("par").await?).then_some(())) },
    )
    .await?;
    let took = start.elapsed();
    controller.stop().await;
    Ok(took)
}

/// Rounds of 1+1 and 1+32, alternated so drift in the machine's load falls on both.
const PARALLEL_ROUNDS: usize = 5;

async fn parallel_provisioning(client: &Client) -> Result<()> {
    // The first run pays for warming up (watches, connections): not measured.
    time_to_ready(client, 1).await?;
    let (mut ones, mut manys) = (Vec::new(), Vec::new());
    for _ in 0..PARALLEL_ROUNDS {
        ones.push(time_to_ready(client, 1).await?);
        manys.push(time_to_ready(client, 32).await?);
    }
    let (one, many) = (median(&mut ones), median(&mut manys));
    println!(
        "parallel provisioning ({}ms per hypervisor step, {}ms per guest step; controller in the bench process; median of {PARALLEL_ROUNDS} alternated rounds):",
        HYPERVISOR_STEP.as_millis(),
        GUEST_STEP.as_millis()
    );
    let rounds = |times: &[Duration]| {
        times
            .iter()
            .map(|t| format!("{:.2}", t.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!(
        "  1+1  Ready in {one:>8.2?}  (rounds, sorted: {} s)",
        rounds(&ones)
    );
    println!(
        "  1+32 Ready in {many:>8.2?}  (rounds, sorted: {} s)",
        rounds(&manys)
    );
    println!(
        "  ratio 1+32 / 1+1 = {:.3} (target < 1.15)",
        many.as_secs_f64() / one.as_secs_f64()
    );
    Ok(())
}

/// The median, sorting `times` on the way.
fn median(times: &mut [Duration]) -> Duration {
    times.sort();
    times.get(times.len() / 2).copied().unwrap_or_default()
}

// ---------------------------------------------------------------------------------
// The controller as a process of its own.

/// A running `bench-controller`, watching one namespace. Killed if dropped; it also
/// stops by itself when this process ends (its stdin closes).
struct ControllerProcess {
    child: tokio::process::Child,
    stdin: Option<tokio::process::ChildStdin>,
    pid: u32,
    addr: SocketAddr,
    log: PathBuf,
}

impl ControllerProcess {
    async fn start(server: &TestApiServer, namespace: &str, resync: Duration) -> Result<Self> {
        let log = server
            .dir()
            .join(format!("bench-controller-{namespace}.log"));
        let stderr =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_bench-controller"))
            .arg("--kubeconfig")
            .arg(server.kubeconfig_path())
            .args(["--namespace", namespace])
            .arg(format!("--resync-interval-ms={}", resync.as_millis()))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .context("starting bench-controller")?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow!("bench-controller ended at once"))?;
        let stdin = child.stdin.take();
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow!("no stdout of bench-controller"))?;
        let mut lines = BufReader::new(stdout).lines();
        let first = tokio::time::timeout(START_DEADLINE, lines.next_line()).await;
        let addr = match first {
            Ok(Ok(Some(line))) => line
                .strip_prefix("listening on http://")
                .and_then(|a| a.parse().ok())
                .ok_or_else(|| anyhow!("bench-controller printed {line:?}")),
            _ => Err(anyhow!(
                "bench-controller did not say where it listens: {}",
                log_tail(&log)
            )),
        }?;
        // Nothing more comes on stdout; keep draining it so a stray line cannot block.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let process = Self {
            child,
            stdin,
            pid,
            addr,
            log,
        };
        let ready = wait::until(
            "bench-controller /readyz",
            START_DEADLINE,
            Duration::from_millis(50),
            || async {
                anyhow::Ok((measure::http_get(addr, "/readyz").await?.0 == 200).then_some(()))
            },
        )
        .await;
        if let Err(error) = ready {
            bail!("{error:#}: {}", log_tail(&process.log));
        }
        Ok(process)
    }

    async fn metrics(&self) -> Result<Scrape> {
        measure::scrape_controller(self.addr)
            .await
            .with_context(|| log_tail(&self.log))
    }

    /// Closes its stdin and waits for it to finish its in-flight passes.
    async fn stop(mut self) {
        drop(self.stdin.take());
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

fn log_tail(log: &std::path::Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let tail = lines[lines.len().saturating_sub(40)..].join("\n");
    format!("last lines of {}:\n{tail}", log.display())
}

/// The counters read at one instant.
struct Reading {
    at: Instant,
    controller: Scrape,
    apiserver: Scrape,
    requests: ApiRequests,
    cpu: Duration,
    rss_kib: u64,
    peak_kib: u64,
}

async fn read(controller: &ControllerProcess, client: &Client) -> Result<Reading> {
    let metrics = controller.metrics().await?;
    let apiserver = measure::scrape_apiserver(client).await?;
    let (rss_kib, peak_kib) = measure::resident_kib(controller.pid)?;
    Ok(Reading {
        at: Instant::now(),
        requests: ApiRequests::from_scrape(&apiserver),
        controller: metrics,
        apiserver,
        cpu: measure::cpu_time(controller.pid)?,
        rss_kib,
        peak_kib,
    })
}

const RECONCILES: &str = "benchcluster_reconciles_total";
const STATUS_PATCHES: &str = "benchcluster_status_patches_total";
const LIBVIRT_CALLS: &str = "benchcluster_libvirt_calls_total";
const LIBVIRT_MUTATIONS: &str = "benchcluster_libvirt_mutations_total";

/// What changed between two readings.
struct Delta<'a> {
    from: &'a Reading,
    to: &'a Reading,
}

impl Delta<'_> {
    fn elapsed(&self) -> Duration {
        self.to.at - self.from.at
    }

    fn controller(&self, name: &str) -> u64 {
        self.to
            .controller
            .count(name, &[])
            .saturating_sub(self.from.controller.count(name, &[]))
    }

    /// `None` when this controller build has no such metric.
    fn controller_opt(&self, name: &str) -> Option<u64> {
        self.to
            .controller
            .declares(name)
            .then(|| self.controller(name))
    }

    fn requests(&self) -> ApiRequests {
        self.to
            .requests
            .since(&self.from.requests)
            .controller_share()
    }

    fn cpu(&self) -> Duration {
        self.to.cpu.saturating_sub(self.from.cpu)
    }

    fn apiserver_cpu(&self) -> f64 {
        let cpu = |r: &Reading| {
            r.apiserver
                .sum("process_cpu_seconds_total", &[])
                .unwrap_or(0.0)
        };
        cpu(self.to) - cpu(self.from)
    }

    fn per_minute(&self, n: u64) -> f64 {
        n as f64 * 60.0 / self.elapsed().as_secs_f64().max(1e-3)
    }
}

fn per(n: u64, d: u64) -> f64 {
    n as f64 / d.max(1) as f64
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// "n/a" when a metric is missing from this build.
fn or_na(value: Option<f64>, precision: usize) -> String {
    value.map_or_else(|| "n/a".to_owned(), |v| format!("{v:.precision$}"))
}

/// Requests by kind, one line each, largest first, divided by `per`.
fn print_requests(requests: &ApiRequests, divide: f64, unit: &str, indent: &str) {
    let mut kinds: Vec<_> = requests.0.iter().collect();
    kinds.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    if kinds.is_empty() {
        println!("{indent}(none)");
    }
    for (kind, n) in kinds {
        println!(
            "{indent}{:<40} {:>10.2} {unit}  ({n})",
            kind.to_string(),
            *n as f64 / divide
        );
    }
}

/// Waits until every BenchCluster the watch follows is Ready, or the deadline; returns
/// how many were Ready.
async fn wait_all_ready(watch: &StatusWatch, count: usize, deadline: Duration) -> usize {
    let start = Instant::now();
    loop {
        let ready = watch.with(|h| h.ready());
        if ready >= count || start.elapsed() >= deadline {
            return ready;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The window at rest: `REST_RESYNCS` resync intervals and at least as many passes per
/// cluster (or four times the interval, if passes are fewer: a controller that does not
/// resync).
async fn rest(controller: &ControllerProcess, clusters: usize, resync: Duration) -> Result<()> {
    let start = Instant::now();
    let base = controller.metrics().await?.count(RECONCILES, &[]);
    let window = resync * REST_RESYNCS;
    let passes = u64::from(REST_RESYNCS) * clusters as u64;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let done = controller
            .metrics()
            .await?
            .count(RECONCILES, &[])
            .saturating_sub(base);
        if (start.elapsed() >= window && done >= passes) || start.elapsed() >= window * 4 {
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------------
// One cluster's lifecycle.

async fn lifecycle(server: &TestApiServer, client: &Client, workers: i32) -> Result<()> {
    let namespace = create_namespace(client, &format!("bench-life{workers}")).await?;
    testbed::create_ssh_secret(client, &namespace).await?;
    let api: Api<BenchCluster> = Api::namespaced(client.clone(), &namespace);
    let watch = StatusWatch::start(api.clone(), false).await?;
    let controller = ControllerProcess::start(server, &namespace, LIFECYCLE_RESYNC).await?;
    let before = read(&controller, client).await?;
    let start = Instant::now();
    api.create(
        &PostParams::default(),
        &testbed::benchcluster(&namespace, "life", workers)?,
    )
    .await?;
    let ready = wait_all_ready(&watch, 1, Duration::from_secs(120)).await;
    let took = watch
        .with(|h| h.all_ready_at())
        .map(|at| at - start)
        .ok_or_else(|| anyhow!("1+{workers} not Ready within 120 s ({ready} Ready)"))?;
    rest(&controller, 1, LIFECYCLE_RESYNC).await?;
    let after = read(&controller, client).await?;
    // Whatever the controller wrote before this reading has reached the watch.
    let version = api
        .get("life")
        .await?
        .resource_version()
        .unwrap_or_default();
    watch.seen("life", &version).await?;
    let seen = watch.snapshot();
    controller.stop().await;

    let delta = Delta {
        from: &before,
        to: &after,
    };
    let history = seen.objects.get("life").cloned().unwrap_or_default();
    println!(
        "1+{workers} lifecycle (create, Ready in {took:.2?}, {} passes; controller process, resync {}s):",
        delta.controller(RECONCILES),
        LIFECYCLE_RESYNC.as_secs()
    );
    println!(
        "  status patches: controller {}, API server {} (APPLY or PATCH benchclusters/status); real transitions (watch) {}; timestamp-only rewrites {} (target: patches = transitions)",
        delta.controller(STATUS_PATCHES),
        delta.requests().status_patches(),
        history.transitions,
        history.timestamp_only,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------
// Many clusters.

/// One scale point's libvirt figures, for the table at the end.
struct Row {
    clusters: usize,
    converging_calls_per_pass: Option<f64>,
    rest_calls_per_pass: Option<f64>,
    rest_calls_per_minute: Option<f64>,
    rest_mutations_per_minute: f64,
}

async fn many_clusters(
    server: &TestApiServer,
    client: &Client,
    count: usize,
    deadline: Duration,
) -> Result<Row> {
    let namespace = create_namespace(client, &format!("bench-many{count}")).await?;
    testbed::create_ssh_secret(client, &namespace).await?;
    let api: Api<BenchCluster> = Api::namespaced(client.clone(), &namespace);
    let watch = StatusWatch::start(api.clone(), false).await?;
    let controller = ControllerProcess::start(server, &namespace, RESYNC).await?;
    let idle = read(&controller, client).await?;

    let start = Instant::now();
    let created = futures::stream::iter(0..count)
        .map(|i| {
            let api = api.clone();
            let namespace = namespace.clone();
            async move {
                let bc = testbed::benchcluster(&namespace, &format!("c{i}"), 0)?;
                api.create(&PostParams::default(), &bc)
                    .await
                    .context("create")
            }
        })
        .buffer_unordered(16)
        .collect::<Vec<_>>()
        .await;
    created.into_iter().collect::<Result<Vec<_>>>()?;
    let created_in = start.elapsed();
    let ready = wait_all_ready(&watch, count, deadline).await;
    let converged = watch.with(|h| h.all_ready_at()).map(|at| at - start);
    let at_ready = read(&controller, client).await?;
    let seen = watch.snapshot();
    let versions_at_ready = versions(&watch);

    rest(&controller, count, RESYNC).await?;
    let at_rest = read(&controller, client).await?;
    let versions_at_rest = versions(&watch);
    controller.stop().await;
    // After the last reading: this LIST is in no figure.
    let events = events_by_reason(client, &namespace).await?;

    let n = count as u64;
    let converging = Delta {
        from: &idle,
        to: &at_ready,
    };
    let resting = Delta {
        from: &at_ready,
        to: &at_rest,
    };
    println!(
        "{count} BenchClusters (1+0 each) on the test hypervisor, the controller in its own process:"
    );
    match converged {
        Some(took) => println!(
            "  created in {created_in:.2?}, all Ready {took:.2?} after the first create (target < 60 s at 1000)"
        ),
        None => println!(
            "  created in {created_in:.2?}; NOT all Ready: {ready} of {count} Ready when the {}s deadline hit",
            deadline.as_secs()
        ),
    }
    println!(
        "  controller resident memory: {:.1} MiB when Ready, peak {:.1} MiB (target < 64 MiB; includes the in-process test driver and guest fake); CPU {:.1?} while converging",
        mib(at_ready.rss_kib),
        mib(at_ready.peak_kib),
        converging.cpu()
    );
    println!(
        "  API server: {:.1} s CPU while converging, {:.0} MiB resident then",
        converging.apiserver_cpu(),
        at_ready
            .apiserver
            .sum("process_resident_memory_bytes", &[])
            .unwrap_or(0.0)
            / (1024.0 * 1024.0)
    );

    let mut requests = converging.requests();
    // The bench's own creates.
    requests.discount("POST", "benchclusters", "", n);
    println!(
        "  status patches per cluster: controller {:.2}, API server {:.2}; real transitions (watch) {:.2}; timestamp-only rewrites {} in all (target: patches = transitions)",
        per(converging.controller(STATUS_PATCHES), n),
        per(requests.status_patches(), n),
        per(seen.transitions(), n),
        seen.timestamp_only(),
    );
    if seen.restarts > 0 {
        println!(
            "  (the bench's watch restarted {} times: transitions may be undercounted)",
            seen.restarts
        );
    }
    println!(
        "  API requests per cluster until all Ready ({:.2} in all; the bench's creates excluded, its watch counted when it ends):",
        per(requests.total(), n)
    );
    print_requests(&requests, count as f64, "/cluster", "    ");

    let passes = converging.controller(RECONCILES);
    let calls = converging.controller_opt(LIBVIRT_CALLS);
    println!(
        "  while converging: {passes} passes ({:.1} per cluster), libvirt calls per pass {}, libvirt mutations per cluster {:.1}",
        per(passes, n),
        or_na(calls.map(|c| per(c, passes)), 1),
        per(converging.controller(LIBVIRT_MUTATIONS), n),
    );

    let rest_requests = resting.requests();
    let rest_passes = resting.controller(RECONCILES);
    let rest_calls = resting.controller_opt(LIBVIRT_CALLS);
    let rest_mutations = resting.controller(LIBVIRT_MUTATIONS);
    let rewritten = versions_at_ready
        .iter()
        .filter(|(name, version)| versions_at_rest.get(*name) != Some(*version))
        .count();
    println!(
        "  {} over {:.1?} ({} resync intervals of {}s): {rest_passes} passes ({:.1} per cluster)",
        if converged.is_some() {
            "at rest"
        } else {
            "NOT at rest (not all Ready)"
        },
        resting.elapsed(),
        REST_RESYNCS,
        RESYNC.as_secs(),
        per(rest_passes, n),
    );
    println!(
        "    API writes per minute {:.1} (target 0), GET/LIST per minute {:.1} (target 0: reads only from watches), {rewritten} of {count} objects rewritten",
        resting.per_minute(rest_requests.writes()),
        resting.per_minute(rest_requests.polling_reads()),
    );
    print_requests(
        &rest_requests,
        resting.elapsed().as_secs_f64() / 60.0,
        "/min",
        "      ",
    );
    println!(
        "    libvirt calls per pass {}, per minute {}; libvirt mutations per minute {:.1} (target 0)",
        or_na(rest_calls.map(|c| per(c, rest_passes)), 1),
        or_na(rest_calls.map(|c| resting.per_minute(c)), 0),
        resting.per_minute(rest_mutations),
    );
    println!("  Events by type and reason (occurrences, an Event's repeats included):");
    for ((type_, reason), n) in events {
        println!("    {type_:<8} {reason:<28} {n}");
    }
    Ok(Row {
        clusters: count,
        converging_calls_per_pass: calls.map(|c| per(c, passes)),
        rest_calls_per_pass: rest_calls.map(|c| per(c, rest_passes)),
        rest_calls_per_minute: rest_calls.map(|c| resting.per_minute(c)),
        rest_mutations_per_minute: resting.per_minute(rest_mutations),
    })
}

async fn events_by_reason(
    client: &Client,
    namespace: &str,
) -> Result<BTreeMap<(String, String), u64>> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let mut counts = BTreeMap::new();
    for event in api.list(&Default::default()).await?.items {
        let occurrences = event
            .series
            .as_ref()
            .map_or(1, |s| u64::try_from(s.count).unwrap_or(1));
        *counts
            .entry((
                event.type_.unwrap_or_default(),
                event.reason.unwrap_or_default(),
            ))
            .or_default() += occurrences;
    }
    Ok(counts)
}

fn versions(watch: &StatusWatch) -> BTreeMap<String, String> {
    watch.with(|h| {
        h.objects
            .iter()
            .map(|(name, o)| (name.clone(), o.resource_version.clone()))
            .collect()
    })
}

fn print_libvirt_table(rows: &[Row]) {
    println!(
        "libvirt calls by clusters on the host (target: per pass and per minute at rest flat in the count; mutations at rest 0):"
    );
    println!(
        "  {:>8} {:>22} {:>20} {:>22} {:>26}",
        "clusters",
        "per pass, converging",
        "per pass, at rest",
        "per minute, at rest",
        "mutations/min, at rest"
    );
    for row in rows {
        println!(
            "  {:>8} {:>22} {:>20} {:>22} {:>26.1}",
            row.clusters,
            or_na(row.converging_calls_per_pass, 1),
            or_na(row.rest_calls_per_pass, 1),
            or_na(row.rest_calls_per_minute, 0),
            row.rest_mutations_per_minute,
        );
    }
}
