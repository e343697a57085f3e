//! Counting what the controller does, for the scale bench and the api tier's write
//! tests: samples of Prometheus text (the controller's `/metrics` and the API server's),
//! the API server's requests by verb and resource, the statuses a watch saw of each
//! BenchCluster, and a process's resident memory and CPU time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use benchcluster_crd::BenchCluster;
use futures::StreamExt;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::testbed;

/// One sample of a Prometheus (or OpenMetrics) text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed scrape: every sample of one `/metrics` answer.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    samples: Vec<Sample>,
    /// Names from `# TYPE` lines: the metrics the exposition declares, with samples or not.
    declared: std::collections::BTreeSet<String>,
}

impl Scrape {
    /// Parses the text format (comments skipped; a line that does not parse is an error,
    /// so a format change cannot silently read as zero).
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let samples = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).with_context(|| format!("metrics line {l:?}")))
            .collect::<anyhow::Result<_>>()?;
        let declared = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_owned)
            .collect();
        Ok(Self { samples, declared })
    }

    /// Whether the exposition declares the metric (`# TYPE`), even with no sample yet
    /// (a labelled family nothing was counted in). `name` may carry the `_total` that
    /// OpenMetrics adds to a counter's samples.
    pub fn declares(&self, name: &str) -> bool {
        self.declared.contains(name)
            || name
                .strip_suffix("_total")
                .is_some_and(|n| self.declared.contains(n))
            || self.has(name)
    }

    /// Whether any sample of `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    /// The samples of `name`.
    pub fn samples<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| s.name == name)
    }

    /// The sum of the samples of `name` whose labels include every pair of `labels`;
    /// `None` when the exposition has no sample of `name` at all (a metric this build
    /// does not have, as opposed to one that is zero).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        if !self.has(name) {
            return None;
        }
        Some(
            self.samples(name)
                .filter(|s| {
                    labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
                })
                .map(|s| s.value)
                .sum(),
        )
    }

    /// [`Scrape::sum`] as a count (0 when absent).
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        as_count(self.sum(name, labels).unwrap_or(0.0))
    }
}

fn as_count(value: f64) -> u64 {
    if value.is_finite() && value > 0.0 {
        // Counters are integers well below 2^53.
        value.round() as u64
    } else {
        0
    }
}

fn parse_sample(line: &str) -> anyhow::Result<Sample> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| anyhow!("no value"))?;
    let name = line[..name_end].to_owned();
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after)?;
        labels = parsed;
        rest = remainder;
    }
    // `value [timestamp]`
    let value = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| anyhow!("no value"))?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// `k="v",k2="v2"}` -> the labels and what follows the `}`.
fn parse_labels(mut text: &str) -> anyhow::Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        text = text.trim_start_matches([',', ' ']);
        if let Some(rest) = text.strip_prefix('}') {
            return Ok((labels, rest));
        }
        let (key, after) = text
            .split_once("=\"")
            .ok_or_else(|| anyhow!("label without a quoted value"))?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                },
                Some((i, '"')) => break i,
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        text = &after[end + 1..];
    }
}

/// `GET path` on a plain-HTTP loopback endpoint (the controller's): status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(
                format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        anyhow::Ok(String::from_utf8(response)?)
    };
    let response = tokio::time::timeout(Duration::from_secs(30), exchange)
        .await
        .map_err(|_| anyhow!("GET http://{addr}{path}: no answer within 30 s"))??;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow!("GET {path}: no end of headers"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| anyhow!("GET {path}: no status"))?
        .parse()?;
    let chunked = head.lines().any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_owned()
    };
    Ok((status, body))
}

fn dechunk(mut body: &str) -> anyhow::Result<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body
            .split_once("\r\n")
            .ok_or_else(|| anyhow!("truncated chunk"))?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)?;
        if size == 0 {
            return Ok(out);
        }
        let chunk = rest.get(..size).ok_or_else(|| anyhow!("truncated chunk"))?;
        out.push_str(chunk);
        body = rest.get(size + 2..).unwrap_or("");
    }
}

/// The controller's metrics served on `addr`.
pub async fn scrape_controller(addr: SocketAddr) -> anyhow::Result<Scrape> {
    let (status, body) = http_get(addr, "/metrics").await?;
    if status != 200 {
        bail!("GET http://{addr}/metrics: {status}");
    }
    Scrape::parse(&body)
}

/// The API server's `/metrics` (the client must be allowed to read it; the test
/// server's admin is).
pub async fn scrape_apiserver(client: &Client) -> anyhow::Result<Scrape> {
    let request = http::Request::get("/metrics").body(Vec::new())?;
    let text = client
        .request_text(request)
        .await
        .context("GET /metrics of the API server")?;
    Scrape::parse(&text)
}

/// One kind of API request, as `apiserver_request_total` labels it. Server-side apply
/// is verb `APPLY` there (a PATCH whose Content-Type is `application/apply-patch+yaml`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RequestKind {
    pub verb: String,
    pub resource: String,
    pub subresource: String,
}

impl std::fmt::Display for RequestKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.subresource.is_empty() {
            write!(f, "{} {}", self.verb, self.resource)
        } else {
            write!(f, "{} {}/{}", self.verb, self.resource, self.subresource)
        }
    }
}

/// What the controller's RBAC lets it touch besides its own CRD and its leader Lease.
pub const CONTROLLER_RESOURCES: [&str; 3] = ["benchclusters", "secrets", "events"];

/// Verbs that change something.
pub const WRITE_VERBS: [&str; 6] = [
    "POST",
    "PUT",
    "PATCH",
    "APPLY",
    "DELETE",
    "DELETECOLLECTION",
];

/// The API server's resource requests, by kind, summed over response codes (requests
/// for non-resource paths such as `/metrics` or `/readyz` are left out). A WATCH is
/// counted when it ends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiRequests(pub BTreeMap<RequestKind, u64>);

impl ApiRequests {
    pub fn from_scrape(scrape: &Scrape) -> Self {
        let mut map = BTreeMap::new();
        for sample in scrape.samples("apiserver_request_total") {
            let label = |k: &str| sample.labels.get(k).cloned().unwrap_or_default();
            let kind = RequestKind {
                verb: label("verb"),
                resource: label("resource"),
                subresource: label("subresource"),
            };
            if kind.resource.is_empty() {
                continue;
            }
            *map.entry(kind).or_default() += as_count(sample.value);
        }
        Self(map)
    }

    pub async fn scrape(client: &Client) -> anyhow::Result<Self> {
        Ok(Self::from_scrape(&scrape_apiserver(client).await?))
    }

    /// What was requested after `earlier` (kinds with none left out).
    pub fn since(&self, earlier: &Self) -> Self {
        Self(
            self.0
                .iter()
                .filter_map(|(kind, n)| {
                    let delta = n.saturating_sub(earlier.0.get(kind).copied().unwrap_or(0));
                    (delta > 0).then(|| (kind.clone(), delta))
                })
                .collect(),
        )
    }

    /// Requests of `verb` on `resource` (and `subresource`, "" for the object itself).
    pub fn get(&self, verb: &str, resource: &str, subresource: &str) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| {
                k.verb == verb && k.resource == resource && k.subresource == subresource
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// The requests a controller without leader election can have made: those on the
    /// resources `manifests/rbac.yaml` grants it (BenchClusters, Secrets, Events, a GET of
    /// its CRD), Leases left out. What the API server does by itself goes with the rest:
    /// its identity Lease renewed every 10 s, its repair loops' LISTs (services), its own
    /// informers' watches on every kind. Those informers watch Secrets and CRDs too: a
    /// WATCH on them that ends may be the server's.
    pub fn controller_share(mut self) -> Self {
        self.0.retain(|kind, _| {
            CONTROLLER_RESOURCES.contains(&kind.resource.as_str())
                || (kind.resource == "customresourcedefinitions" && kind.verb == "GET")
        });
        self
    }

    /// Removes `n` requests of a kind (the harness's own, known in advance).
    pub fn discount(&mut self, verb: &str, resource: &str, subresource: &str, n: u64) {
        let kind = RequestKind {
            verb: verb.to_owned(),
            resource: resource.to_owned(),
            subresource: subresource.to_owned(),
        };
        if let Some(count) = self.0.get_mut(&kind) {
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.0.remove(&kind);
            }
        }
    }

    /// Status patches of BenchClusters: server-side applies (verb APPLY) and any other
    /// PATCH of the status subresource.
    pub fn status_patches(&self) -> u64 {
        self.get("APPLY", "benchclusters", "status") + self.get("PATCH", "benchclusters", "status")
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Requests that change something.
    pub fn writes(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| WRITE_VERBS.contains(&k.verb.as_str()))
            .map(|(_, n)| n)
            .sum()
    }

    /// Reads that did not come from a watch: GET and LIST.
    pub fn polling_reads(&self) -> u64 {
        self.0
            .iter()
            .filter(|(k, _)| k.verb == "GET" || k.verb == "LIST")
            .map(|(_, n)| n)
            .sum()
    }
}

/// A BenchCluster's status as compared for transitions: conditions'
/// `lastTransitionTime` removed (it moves with the condition, and a pass that rewrites
/// only the time has changed nothing). `Null` for no status.
pub fn comparable_status(bc: &BenchCluster) -> Value {
    let mut value = match &bc.status {
        Some(status) => serde_json::to_value(status).unwrap_or(Value::Null),
        None => Value::Null,
    };
    if let Some(conditions) = value.get_mut("conditions").and_then(Value::as_array_mut) {
        for condition in conditions {
            if let Some(condition) = condition.as_object_mut() {
                condition.remove("lastTransitionTime");
            }
        }
    }
    value
}

/// What a watch saw of one BenchCluster.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Watch events for it (every new resourceVersion, metadata-only ones included).
    pub events: u64,
    pub resource_version: String,
    /// Changes of [`comparable_status`] from one event to the next, the first status
    /// included: the real transitions.
    pub transitions: u64,
    /// Events whose status differed from the one before only in a condition's
    /// `lastTransitionTime`: a status write that changed nothing.
    pub timestamp_only: u64,
    /// The distinct consecutive statuses, when the watch keeps them.
    pub statuses: Vec<Value>,
    /// When the watch first saw it Ready for its generation.
    pub ready_at: Option<Instant>,
    pub ready: bool,
    last_raw: Option<Value>,
    last: Option<Value>,
}

impl History {
    fn observe(&mut self, bc: &BenchCluster, keep: bool) {
        let version = bc.resource_version().unwrap_or_default();
        if version == self.resource_version {
            return; // the same object again (a re-list)
        }
        self.events += 1;
        self.resource_version = version;
        let raw = bc
            .status
            .as_ref()
            .and_then(|s| serde_json::to_value(s).ok())
            .unwrap_or(Value::Null);
        let comparable = comparable_status(bc);
        let previous = self.last.clone().unwrap_or(Value::Null);
        if comparable != previous {
            self.transitions += 1;
            if keep {
                self.statuses.push(comparable.clone());
            }
        } else if self.last_raw.as_ref().is_some_and(|r| *r != raw) {
            self.timestamp_only += 1;
        }
        self.last_raw = Some(raw);
        self.last = Some(comparable);
        self.ready = testbed::is_ready(bc);
        if self.ready && self.ready_at.is_none() {
            self.ready_at = Some(Instant::now());
        }
    }
}

/// Everything the watch saw, by BenchCluster name.
#[derive(Debug, Clone, Default)]
pub struct Histories {
    pub objects: BTreeMap<String, History>,
    /// Times the watch had to start over (a re-list): events between may be missed.
    pub restarts: u64,
}

impl Histories {
    pub fn ready(&self) -> usize {
        self.objects.values().filter(|h| h.ready).count()
    }

    pub fn transitions(&self) -> u64 {
        self.objects.values().map(|h| h.transitions).sum()
    }

    pub fn timestamp_only(&self) -> u64 {
        self.objects.values().map(|h| h.timestamp_only).sum()
    }

    /// When the last of them became Ready, if all did.
    pub fn all_ready_at(&self) -> Option<Instant> {
        self.objects
            .values()
            .map(|h| h.ready_at)
            .try_fold(None, |latest: Option<Instant>, at| {
                at.map(|at| Some(latest.map_or(at, |l| l.max(at))))
            })
            .flatten()
    }
}

/// A watch on the BenchClusters of one namespace, recording each one's [`History`].
/// The watch stops when this is dropped.
pub struct StatusWatch {
    histories: Arc<Mutex<Histories>>,
    task: tokio::task::JoinHandle<()>,
}

impl StatusWatch {
    /// Starts watching; `keep_statuses` keeps every distinct status (for a test's
    /// failure message; the bench keeps only counts). Returns once the initial list
    /// is in, so nothing created afterwards is missed.
    pub async fn start(api: Api<BenchCluster>, keep_statuses: bool) -> anyhow::Result<Self> {
        let histories = Arc::new(Mutex::new(Histories::default()));
        let (listed, on_listed) = tokio::sync::oneshot::channel::<()>();
        let recording = Arc::clone(&histories);
        let task = tokio::spawn(async move {
            let mut listed = Some(listed);
            let mut stream = watcher(api, watcher::Config::default()).boxed();
            while let Some(event) = stream.next().await {
                let Ok(event) = event else { continue };
                let mut h = recording.lock().unwrap_or_else(PoisonError::into_inner);
                match event {
                    watcher::Event::Init => {
                        if listed.is_none() {
                            h.restarts += 1;
                        }
                    }
                    watcher::Event::InitDone => {
                        if let Some(listed) = listed.take() {
                            let _ = listed.send(());
                        }
                    }
                    watcher::Event::InitApply(bc) | watcher::Event::Apply(bc) => h
                        .objects
                        .entry(bc.name_any())
                        .or_default()
                        .observe(&bc, keep_statuses),
                    watcher::Event::Delete(bc) => {
                        if let Some(history) = h.objects.get_mut(&bc.name_any()) {
                            history.ready = false;
                        }
                    }
                }
            }
        });
        tokio::time::timeout(Duration::from_secs(60), on_listed)
            .await
            .map_err(|_| anyhow!("the BenchCluster watch did not list within 60 s"))?
            .map_err(|_| anyhow!("the BenchCluster watch ended before listing"))?;
        Ok(Self { histories, task })
    }

    /// A copy of what was seen so far.
    pub fn snapshot(&self) -> Histories {
        self.lock().clone()
    }

    /// Reads the histories without copying them.
    pub fn with<T>(&self, f: impl FnOnce(&Histories) -> T) -> T {
        f(&self.lock())
    }

    fn lock(&self) -> MutexGuard<'_, Histories> {
        self.histories
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits until the watch has seen `name` at `resource_version` (or later).
    pub async fn seen(&self, name: &str, resource_version: &str) -> anyhow::Result<()> {
        let target: u64 = resource_version.parse().unwrap_or(u64::MAX);
        crate::wait::until(
            &format!("the watch to see {name} at resourceVersion {resource_version}"),
            Duration::from_secs(30),
            Duration::from_millis(20),
            || async {
                self.with(|h| {
                    h.objects
                        .get(name)
                        .and_then(|o| o.resource_version.parse::<u64>().ok())
                        .is_some_and(|v| v >= target)
                        .then_some(())
                })
            },
        )
        .await
    }
}

impl Drop for StatusWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A process's resident memory now and at its peak, in KiB (`VmRSS`, `VmHWM`).
pub fn resident_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| anyhow!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    // The command name (field 2) is in parentheses and may hold spaces: count from
    // after its closing one, where field 3 starts; utime and stime are fields 14, 15.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        fields
            .get(i)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))
    };
    let total = ticks(11)? + ticks(12)?;
    let per_second = rustix::param::clock_ticks_per_second().max(1);
    Ok(Duration::from_secs_f64(total as f64 / per_second as f64))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;

    #[test]
    fn parses_both_expositions() {
        let text = "# HELP x\n# TYPE apiserver_request_total counter\n\
            apiserver_request_total{code=\"200\",resource=\"benchclusters\",subresource=\"status\",verb=\"APPLY\"} 7\n\
            apiserver_request_total{code=\"409\",resource=\"benchclusters\",subresource=\"status\",verb=\"APPLY\"} 2\n\
            apiserver_request_total{code=\"200\",resource=\"\",subresource=\"/metrics\",verb=\"GET\"} 3\n\
            apiserver_request_total{code=\"200\",resource=\"secrets\",subresource=\"\",verb=\"GET\"} 5\n\
            benchcluster_reconciles_total 12\n\
            odd{a=\"x\\\"y,}\"} 1.5e3 1700000000\n\
            # EOF\n";
        let scrape = Scrape::parse(text).unwrap();
        assert_eq!(scrape.count("benchcluster_reconciles_total", &[]), 12);
        assert_eq!(scrape.sum("benchcluster_libvirt_calls_total", &[]), None);
        assert!(!scrape.declares("benchcluster_libvirt_calls_total"));
        assert!(scrape.declares("apiserver_request_total"));
        let declared = Scrape::parse("# TYPE benchcluster_libvirt_calls counter\n").unwrap();
        assert!(declared.declares("benchcluster_libvirt_calls_total"));
        assert_eq!(scrape.sum("odd", &[("a", "x\"y,}")]), Some(1500.0));
        let requests = ApiRequests::from_scrape(&scrape);
        assert_eq!(requests.status_patches(), 9);
        assert_eq!(requests.get("GET", "secrets", ""), 5);
        assert_eq!(requests.total(), 14, "non-resource requests left out");
        assert_eq!(requests.writes(), 9);
        assert_eq!(requests.polling_reads(), 5);
        let mut later = requests.clone();
        *later
            .0
            .get_mut(&RequestKind {
                verb: "GET".into(),
                resource: "secrets".into(),
                subresource: String::new(),
            })
            .unwrap() += 4;
        let delta = later.since(&requests);
        assert_eq!(delta.total(), 4);
        assert!(Scrape::parse("garbage line here").is_err());
    }

    #[test]
    fn the_api_servers_own_requests_are_left_out() {
        let text = "apiserver_request_total{resource=\"leases\",subresource=\"\",verb=\"PUT\"} 3\n\
            apiserver_request_total{resource=\"services\",subresource=\"\",verb=\"LIST\"} 1\n\
            apiserver_request_total{resource=\"customresourcedefinitions\",subresource=\"\",verb=\"WATCH\"} 1\n\
            apiserver_request_total{resource=\"customresourcedefinitions\",subresource=\"\",verb=\"GET\"} 1\n\
            apiserver_request_total{resource=\"secrets\",subresource=\"\",verb=\"GET\"} 2\n";
        let requests = ApiRequests::from_scrape(&Scrape::parse(text).unwrap());
        assert_eq!((requests.writes(), requests.polling_reads()), (3, 4));
        let theirs = requests.controller_share();
        assert_eq!(
            (theirs.writes(), theirs.polling_reads(), theirs.total()),
            (0, 3, 3)
        );
    }

    #[test]
    fn dechunks() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
    }

    #[test]
    fn own_process_figures() {
        let (rss, peak) = resident_kib(std::process::id()).unwrap();
        assert!(rss > 0 && peak >= rss);
        cpu_time(std::process::id()).unwrap();
    }
}
