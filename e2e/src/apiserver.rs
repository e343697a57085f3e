//! A real kube-apiserver and etcd on loopback, with a cluster-admin kubeconfig.
//!
//! There is no kube-controller-manager: nothing garbage-collects owner references,
//! deletes namespaces or mints service-account tokens. Tests isolate themselves in a
//! namespace of their own ([`crate::create_namespace`]) instead of cleaning up.

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use tokio::time::Instant;

use crate::pki::{self, ADMIN_USER};
use crate::process::Supervised;
use crate::wait;

/// Environment variable naming a directory holding `kube-apiserver`, `etcd` and
/// `kubectl`. Unset: `e2e/hack/build-k8s.sh` builds them (or finds them in its cache).
pub const BIN_DIR_ENV: &str = "BENCHCLUSTER_K8S_BIN";
/// Set to `1` to keep the server's directory (certificates, logs, etcd data) after it stops.
pub const KEEP_ENV: &str = "BENCHCLUSTER_E2E_KEEP";
/// Field manager of every write the harness makes.
pub const FIELD_MANAGER: &str = "benchcluster-e2e";

/// Until `/readyz` answers `ok` after the processes started.
const READY_DEADLINE: Duration = Duration::from_secs(120);
/// Until a newly applied CRD is Established.
const CRD_DEADLINE: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// Starts retried when a process exits during start-up: the likely cause is that a
/// port picked as free was taken by someone else before the process bound it.
const START_ATTEMPTS: u32 = 3;
/// Lines of each log that [`TestApiServer::dump_logs`] prints.
const LOG_TAIL_LINES: usize = 60;

const BINARIES: [&str; 3] = ["kube-apiserver", "etcd", "kubectl"];

/// A kube-apiserver backed by its own etcd, both on 127.0.0.1 only, both SIGKILLed when
/// this is dropped or when the test process exits, however it exits.
#[derive(Debug)]
pub struct TestApiServer {
    apiserver: Supervised,
    etcd: Supervised,
    url: String,
    bin_dir: PathBuf,
    kubeconfig: PathBuf,
    kubectl_cache: PathBuf,
    root: PathBuf,
    /// `None` when kept ([`KEEP_ENV`]). Dropped after the processes are stopped.
    _dir: Option<tempfile::TempDir>,
}

/// Why one start attempt failed.
enum StartError {
    /// A process ended during start-up; worth another attempt with other ports.
    Exited(anyhow::Error),
    Other(anyhow::Error),
}

impl From<anyhow::Error> for StartError {
    fn from(error: anyhow::Error) -> Self {
        Self::Other(error)
    }
}

static SHARED: tokio::sync::OnceCell<Result<TestApiServer, String>> =
    tokio::sync::OnceCell::const_new();

impl TestApiServer {
    /// Starts etcd and kube-apiserver on free loopback ports and waits for `/readyz`.
    pub async fn start() -> anyhow::Result<Self> {
        let bin_dir = k8s_bin_dir().await?;
        let mut failures = Vec::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::start_once(&bin_dir).await {
                Ok(server) => return Ok(server),
                Err(StartError::Other(error)) => return Err(error),
                Err(StartError::Exited(error)) => {
                    eprintln!("kube-apiserver start attempt {attempt} failed: {error:#}");
                    failures.push(error);
                }
            }
        }
        let last = failures.pop().unwrap_or_else(|| anyhow!("no attempt made"));
        Err(last.context(format!(
            "kube-apiserver did not start in {START_ATTEMPTS} attempts"
        )))
    }

    /// One server for the whole test binary, started by the first caller. It lives until
    /// the process exits (the watchdogs then kill it and remove its directory). A failed
    /// start is remembered, so later callers fail fast with the same message.
    pub async fn shared() -> anyhow::Result<&'static TestApiServer> {
        let result = SHARED
            .get_or_init(|| async { Self::start().await.map_err(|e| format!("{e:#}")) })
            .await;
        result
            .as_ref()
            .map_err(|e| anyhow!("the shared kube-apiserver failed to start: {e}"))
    }

    async fn start_once(bin_dir: &Path) -> Result<Self, StartError> {
        let keep = std::env::var(KEEP_ENV).is_ok_and(|v| v == "1");
        let dir = tempfile::Builder::new()
            .prefix("benchcluster-apiserver-")
            .tempdir()
            .context("creating the server's temporary directory")?;
        let root = dir.path().to_owned();
        let dir = if keep {
            eprintln!("keeping {} ({KEEP_ENV}=1)", root.display());
            let _ = dir.keep();
            None
        } else {
            Some(dir)
        };

        let pki = pki::write(&root)?;
        let [etcd_client, etcd_peer, secure_port] = free_ports()?;
        let etcd_url = format!("http://127.0.0.1:{etcd_client}");
        let peer_url = format!("http://127.0.0.1:{etcd_peer}");
        let etcd_args = vec![
            "--name=e2e".to_owned(),
            format!("--data-dir={}", root.join("etcd").display()),
            format!("--listen-client-urls={etcd_url}"),
            format!("--advertise-client-urls={etcd_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=e2e={peer_url}"),
            "--initial-cluster-state=new".to_owned(),
            // Test data need not survive a power cut; fsync dominates etcd's latency.
            "--unsafe-no-fsync".to_owned(),
            "--log-level=warn".to_owned(),
        ];
        // The etcd watchdog removes the whole directory: etcd is stopped last, and a
        // server kept in a `static` is never dropped, so its TempDir never cleans up.
        let cleanup = (!keep).then_some(root.as_path());
        let mut etcd = Supervised::spawn(
            "etcd",
            &bin_dir.join("etcd"),
            &etcd_args,
            &root.join("etcd.log"),
            cleanup,
        )?;

        let apiserver_args = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".to_owned(),
            "--advertise-address=127.0.0.1".to_owned(),
            format!("--secure-port={secure_port}"),
            format!("--cert-dir={}", root.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", pki.serving_cert.display()),
            format!("--tls-private-key-file={}", pki.serving_key.display()),
            format!("--client-ca-file={}", pki.ca_cert.display()),
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local".to_owned(),
            format!(
                "--service-account-key-file={}",
                pki.service_account_pub.display()
            ),
            format!(
                "--service-account-signing-key-file={}",
                pki.service_account_key.display()
            ),
            // Only an allocation range for Service IPs; nothing is ever sent there.
            "--service-cluster-ip-range=10.96.0.0/24".to_owned(),
            "--authorization-mode=RBAC".to_owned(),
            // Needs service-account tokens, which only kube-controller-manager mints.
            "--disable-admission-plugins=ServiceAccount".to_owned(),
            "--enable-priority-and-fairness=false".to_owned(),
            // The default reconciler publishes the advertise address as the endpoint of
            // Service "kubernetes", which endpoint validation refuses for loopback.
            "--endpoint-reconciler-type=none".to_owned(),
            "--profiling=false".to_owned(),
        ];
        let apiserver = Supervised::spawn(
            "kube-apiserver",
            &bin_dir.join("kube-apiserver"),
            &apiserver_args,
            &root.join("kube-apiserver.log"),
            None,
        );
        let mut apiserver = match apiserver {
            Ok(apiserver) => apiserver,
            Err(error) => {
                etcd.stop();
                return Err(error.into());
            }
        };

        let url = format!("https://127.0.0.1:{secure_port}");
        let kubeconfig = root.join("kubeconfig");
        write_kubeconfig(&kubeconfig, &url, &pki)?;

        let ready = wait_ready(&kubeconfig, &mut [&mut etcd, &mut apiserver]).await;
        let server = Self {
            apiserver,
            etcd,
            url,
            bin_dir: bin_dir.to_owned(),
            kubeconfig,
            kubectl_cache: root.join("kubectl-cache"),
            root,
            _dir: dir,
        };
        match ready {
            Ok(()) => Ok(server),
            Err(error) => {
                let logs = server.log_tails();
                let wrap = |e: anyhow::Error| e.context(logs);
                Err(match error {
                    StartError::Exited(e) => StartError::Exited(wrap(e)),
                    StartError::Other(e) => StartError::Other(wrap(e)),
                })
            }
        }
    }

    /// `https://127.0.0.1:<port>`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kubeconfig with cluster-admin rights (user `benchcluster-admin`, group
    /// `system:masters`), its certificate paths absolute.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// The server's scratch directory, removed with it: tests may put files here.
    pub fn dir(&self) -> &Path {
        &self.root
    }

    /// Where `kube-apiserver`, `etcd` and `kubectl` came from.
    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    /// A client authenticated as cluster-admin. Build one per test (per runtime): a
    /// client's connections belong to the runtime that made them.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        client_from(&self.kubeconfig).await
    }

    /// `kubectl --kubeconfig <ours> <args>`, from the same build as the server.
    pub fn kubectl(&self, args: &[&str]) -> Command {
        let mut command = Command::new(self.bin_dir.join("kubectl"));
        command
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(&self.kubectl_cache)
            .args(args)
            .env_remove("KUBECONFIG");
        command
    }

    /// Server-side applies the repository's `manifests/crd.yaml` and waits until the CRD
    /// is Established. Idempotent: every test may call it.
    pub async fn install_crd(&self) -> anyhow::Result<()> {
        let path = crd_manifest_path();
        let yaml = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {} (run `cargo xtask crd`)", path.display()))?;
        let crd: CustomResourceDefinition =
            serde_yaml::from_str(&yaml).with_context(|| format!("parsing {}", path.display()))?;
        let name = crd
            .metadata
            .name
            .clone()
            .ok_or_else(|| anyhow!("{} has no metadata.name", path.display()))?;
        let crds: Api<CustomResourceDefinition> = Api::all(self.client().await?);
        crds.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .with_context(|| format!("applying CRD {name}"))?;
        wait::until(
            &format!("CRD {name} to be Established"),
            CRD_DEADLINE,
            POLL,
            || async {
                let crd = crds.get(&name).await?;
                let established = crd
                    .status
                    .and_then(|s| s.conditions)
                    .unwrap_or_default()
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True");
                anyhow::Ok(established.then_some(()))
            },
        )
        .await
    }

    /// Prints the tails of the etcd and kube-apiserver logs to stderr (which the test
    /// harness shows for a failed test). Call it on failure paths.
    pub fn dump_logs(&self) {
        eprintln!("{}", self.log_tails());
    }

    fn log_tails(&self) -> String {
        let mut out = format!("server directory: {}", self.root.display());
        for process in [&self.etcd, &self.apiserver] {
            out.push_str(&format!(
                "\n----- last {LOG_TAIL_LINES} lines of {} ({}) -----\n{}",
                process.name(),
                process.log().display(),
                process.log_tail(LOG_TAIL_LINES)
            ));
        }
        out
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        // The apiserver first, so it does not log a storm of etcd errors; etcd's
        // watchdog then removes the directory.
        self.apiserver.stop();
        self.etcd.stop();
    }
}

/// The repository's `manifests/crd.yaml`.
pub fn crd_manifest_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/crd.yaml")
}

/// The directory with `kube-apiserver`, `etcd` and `kubectl`: [`BIN_DIR_ENV`] if set,
/// else what `e2e/hack/build-k8s.sh` prints (it builds them on first use, ~6 minutes).
pub async fn k8s_bin_dir() -> anyhow::Result<PathBuf> {
    let dir = match std::env::var_os(BIN_DIR_ENV) {
        Some(dir) => PathBuf::from(dir),
        None => tokio::task::spawn_blocking(build_k8s).await??,
    };
    for binary in BINARIES {
        let path = dir.join(binary);
        if !path.is_file() {
            bail!(
                "{} is missing: {BIN_DIR_ENV} must name a directory with {BINARIES:?} \
                 (e2e/hack/build-k8s.sh builds them)",
                path.display()
            );
        }
    }
    Ok(dir)
}

fn build_k8s() -> anyhow::Result<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("hack/build-k8s.sh");
    eprintln!(
        "{BIN_DIR_ENV} unset: running {} (the first build takes ~6 minutes)",
        script.display()
    );
    let output = Command::new(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!("{} failed: {}", script.display(), output.status);
    }
    let stdout = String::from_utf8(output.stdout)?;
    let dir = stdout
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .ok_or_else(|| anyhow!("{} printed no directory", script.display()))?;
    Ok(PathBuf::from(dir.trim()))
}

/// Distinct loopback ports nobody listens on right now. All are held until all are
/// picked so they differ; someone may still take one before our process binds it,
/// which `start` answers with another attempt.
fn free_ports<const N: usize>() -> anyhow::Result<[u16; N]> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in &mut ports {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
        *port = listener.local_addr()?.port();
        listeners.push(listener);
    }
    Ok(ports)
}

fn write_kubeconfig(path: &Path, url: &str, pki: &pki::Pki) -> anyhow::Result<()> {
    let config = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{
            "name": "benchcluster-e2e",
            "cluster": {"server": url, "certificate-authority": pki.ca_cert},
        }],
        "users": [{
            "name": ADMIN_USER,
            "user": {"client-certificate": pki.admin_cert, "client-key": pki.admin_key},
        }],
        "contexts": [{
            "name": "benchcluster-e2e",
            "context": {"cluster": "benchcluster-e2e", "user": ADMIN_USER, "namespace": "default"},
        }],
        "current-context": "benchcluster-e2e",
    });
    std::fs::write(path, serde_yaml::to_string(&config)?)
        .with_context(|| format!("writing {}", path.display()))
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<kube::Client> {
    let kubeconfig = Kubeconfig::read_from(kubeconfig)?;
    let config =
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// Polls `/readyz` until it answers `ok`, failing at once if a process ends.
async fn wait_ready(
    kubeconfig: &Path,
    processes: &mut [&mut Supervised],
) -> Result<(), StartError> {
    let start = Instant::now();
    let deadline = start + READY_DEADLINE;
    let client = client_from(kubeconfig).await?;
    let mut last = String::from("no answer yet");
    loop {
        for process in processes.iter_mut() {
            if let Some(status) = process.exited() {
                return Err(StartError::Exited(anyhow!(
                    "{} exited during start-up ({status})",
                    process.name()
                )));
            }
        }
        let request = http::Request::get("/readyz").body(Vec::new());
        let request = request.map_err(|e| StartError::Other(e.into()))?;
        match tokio::time::timeout_at(deadline, client.request_text(request)).await {
            Ok(Ok(body)) if body.trim() == "ok" => return Ok(()),
            Ok(Ok(body)) => last = body,
            Ok(Err(error)) => last = error.to_string(),
            Err(_elapsed) => {}
        }
        if Instant::now() + POLL >= deadline {
            return Err(StartError::Other(anyhow!(
                "kube-apiserver not ready after {:.1?}; last /readyz answer: {last}",
                start.elapsed()
            )));
        }
        tokio::time::sleep(POLL).await;
    }
}
