//! `cargo xtask up` and `cargo xtask down`: the local sandbox.
//!
//! `up [FILE]` builds what is missing, then starts `benchcluster-sandbox` (e2e/src/bin)
//! as a daemon of its own process group, which brings up libvirtd in a network
//! namespace, a kube-apiserver, the controller and the BenchCluster of FILE (default
//! the example; see its docs), with the image volumes and the SSH key Secret FILE
//! names. `up` waits until that BenchCluster is Ready, printing its progress, writes the
//! guest cluster's kubeconfig next to the management one, and prints how to use both.
//! Run again, it only prints that. `down` sends the daemon SIGTERM and waits until it
//! has torn everything down.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use serde::Deserialize;

use super::{INSTALL_DEPS, K8S_BIN_ENV, KUBE_IMAGE_ENV, cargo, k8s_bin_dir, kube_image, step};

/// The network namespace the sandbox creates (`ip netns exec` it to reach the VMs).
const NETNS: &str = "benchcluster-up";
/// The BenchCluster `up` applies when given no file.
const DEFAULT_EXAMPLE: &str = "manifests/examples/benchcluster.yaml";
/// The line of the env file naming the applied BenchCluster, `<namespace>/<name>`.
const EXAMPLE_ENV: &str = "BENCHCLUSTER_EXAMPLE";
/// Key of the admin kubeconfig in the `<name>-kubeconfig` Secret.
const KUBECONFIG_KEY: &str = "value";
const DAEMON: &str = "benchcluster-sandbox";
/// Until the sandbox, the API server and the controller are up (an image build, if
/// any, happens before the daemon starts).
const START_DEADLINE: Duration = Duration::from_secs(10 * 60);
/// Boots and `kubeadm init` under software emulation, on a busy machine.
const READY_DEADLINE: Duration = Duration::from_secs(60 * 60);
/// Destroying the VMs and stopping libvirtd.
const STOP_DEADLINE: Duration = Duration::from_secs(3 * 60);
const POLL: Duration = Duration::from_secs(2);
const KUBECTL_TIMEOUT: &str = "--request-timeout=10s";
/// One progress line: Ready, workers Ready of desired in every pool, each pool's, the
/// Ready condition's reason and message (which names the node holding things up).
const PROGRESS: &str = "jsonpath=Ready={.status.conditions[?(@.type==\"Ready\")].status} \
    workers={.status.readyWorkers}/{.status.desiredWorkers} [{.status.poolSummary}] \
    {.status.conditions[?(@.type==\"Ready\")].reason}: \
    {.status.conditions[?(@.type==\"Ready\")].message}";

/// Files of a running sandbox, under `target/up`.
struct State {
    dir: PathBuf,
}

impl State {
    fn new(root: &Path) -> Self {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        Self {
            dir: target.join("up"),
        }
    }
    fn pid(&self) -> PathBuf {
        self.dir.join("pid")
    }
    /// Written by the daemon once everything runs.
    fn env(&self) -> PathBuf {
        self.dir.join("env")
    }
    fn log(&self) -> PathBuf {
        self.dir.join("sandbox.log")
    }
    fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }
    fn guest_kubeconfig(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.kubeconfig"))
    }
    fn controller_log(&self) -> PathBuf {
        self.dir.join("controller.log")
    }

    /// The daemon's pid, if it is running.
    fn running(&self) -> Option<u32> {
        let pid: u32 = std::fs::read_to_string(self.pid())
            .ok()?
            .trim()
            .parse()
            .ok()?;
        alive(pid).then_some(pid)
    }

    /// `<namespace>/<name>` of the BenchCluster the running sandbox applied, from its
    /// env file.
    fn applied(&self) -> Option<(String, String)> {
        let text = std::fs::read_to_string(self.env()).ok()?;
        let (namespace, name) = env_value(&text, EXAMPLE_ENV)?.split_once('/')?;
        Some((namespace.to_owned(), name.to_owned()))
    }
}

/// The value of `key` in an env file of `KEY=value` and `export KEY=value` lines.
fn env_value<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines().find_map(|line| {
        let line = line.trim();
        let (k, v) = line
            .strip_prefix("export ")
            .unwrap_or(line)
            .split_once('=')?;
        (k == key).then_some(v)
    })
}

/// What `up` reads from the BenchCluster manifest it applies.
#[derive(Debug, PartialEq)]
struct Example {
    name: String,
    namespace: String,
    /// The image volumes its nodes boot from, each once, in the file's order.
    volumes: Vec<String>,
    /// `<namespace>/<name>` of its `spec.ssh.keySecret`.
    ssh_secret: String,
}

/// The parts of a BenchCluster manifest `up` needs (serde skips the rest).
#[derive(Deserialize)]
struct Manifest {
    kind: String,
    metadata: Metadata,
    spec: Spec,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Spec {
    control_plane: Node,
    workers: Node,
    #[serde(default)]
    pools: Vec<Node>,
    ssh: Ssh,
}

#[derive(Deserialize)]
struct Node {
    image: Image,
}

#[derive(Deserialize)]
struct Image {
    volume: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Ssh {
    key_secret: SecretName,
}

#[derive(Deserialize)]
struct SecretName {
    name: String,
}

impl Example {
    fn read(path: &Path) -> anyhow::Result<Self> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("reading {} as a BenchCluster", path.display()))
    }

    fn parse(text: &str) -> anyhow::Result<Self> {
        let manifest: Manifest = serde_yaml::from_str(text)?;
        if manifest.kind != "BenchCluster" {
            bail!("its kind is {}, not BenchCluster", manifest.kind);
        }
        let namespace = manifest
            .metadata
            .namespace
            .unwrap_or_else(|| "default".to_owned());
        let spec = manifest.spec;
        let mut volumes: Vec<String> = Vec::new();
        let nodes = [&spec.control_plane, &spec.workers]
            .into_iter()
            .chain(&spec.pools);
        for node in nodes {
            if !volumes.contains(&node.image.volume) {
                volumes.push(node.image.volume.clone());
            }
        }
        Ok(Self {
            ssh_secret: format!("{namespace}/{}", spec.ssh.key_secret.name),
            name: manifest.metadata.name,
            namespace,
            volumes,
        })
    }

    /// `<namespace>/<name>`.
    fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// `bc/<name>`, with `-n <namespace>` unless it is `default`: for the hints.
fn kubectl_ref(namespace: &str, name: &str) -> String {
    if namespace == "default" {
        format!("bc/{name}")
    } else {
        format!("bc/{name} -n {namespace}")
    }
}

/// The state directory of the sandbox `up` left running, as an absolute path, for a
/// test to attach to; an error saying how to start one if there is none.
pub(crate) fn running_state_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let state = State::new(root);
    let dir = std::path::absolute(&state.dir)
        .with_context(|| format!("resolving {}", state.dir.display()))?;
    if !state.env().exists() {
        bail!(
            "no sandbox is up ({} does not exist): run `cargo xtask up e2e/cluster.yaml` first",
            state.env().display()
        );
    }
    if state.running().is_none() {
        bail!(
            "{} is left from a sandbox that no longer runs: run `cargo xtask down`, then \
             `cargo xtask up e2e/cluster.yaml`",
            state.env().display()
        );
    }
    match state.applied() {
        Some((namespace, name)) => println!(
            "against bc/{name} (namespace {namespace}) of the sandbox in {}",
            dir.display()
        ),
        None => println!("against the sandbox in {}", dir.display()),
    }
    Ok(dir)
}

/// `pid` is a live (not zombie) benchcluster-sandbox.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": comm is truncated to 15 bytes, so check the command line.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    state != Some("Z") && String::from_utf8_lossy(&cmdline).contains(DAEMON)
}

/// `file`: the BenchCluster manifest to apply, relative to the current directory
/// (default: the example).
pub(crate) fn up(root: &Path, file: Option<&str>) -> anyhow::Result<()> {
    let state = State::new(root);
    let manifest = match file {
        Some(file) => std::path::absolute(file).with_context(|| format!("resolving {file}"))?,
        None => root.join(DEFAULT_EXAMPLE),
    };
    let example = Example::read(&manifest)?;
    if let Some(pid) = state.running() {
        println!("the sandbox is already running (pid {pid})");
        let (namespace, name) = state
            .applied()
            .unwrap_or_else(|| (example.namespace.clone(), example.name.clone()));
        if (namespace.as_str(), name.as_str())
            != (example.namespace.as_str(), example.name.as_str())
        {
            println!(
                "it runs bc/{name} (namespace {namespace}), not {}'s {}: \
                 `cargo xtask down` first to start that one",
                manifest.display(),
                example.key()
            );
        }
        let bin_dir = k8s_bin_dir(root)?;
        return instructions(&state, &bin_dir, &namespace, &name);
    }
    if !is_root() {
        bail!("`cargo xtask up` needs root: network namespaces, libvirtd, qemu");
    }
    if Path::new("/run/netns").join(NETNS).exists() {
        bail!(
            "the network namespace {NETNS} exists, left by an earlier sandbox: run `cargo xtask down`"
        );
    }
    let started = Instant::now();
    step(Command::new(root.join(INSTALL_DEPS)))?;
    let bin_dir = k8s_bin_dir(root)?;
    let image = kube_image(root)?;
    let mut build = cargo(root);
    build.args([
        "build",
        "-p",
        "benchcluster-controller",
        "--bin",
        "benchcluster-controller",
        "-p",
        "benchcluster-e2e",
        "--bin",
        DAEMON,
    ]);
    step(build)?;
    let target = state.dir.parent().map(Path::to_owned).unwrap_or_default();
    let bin = target.join("debug");

    std::fs::create_dir_all(&state.dir)
        .with_context(|| format!("creating {}", state.dir.display()))?;
    for stale in [
        state.env(),
        state.guest_kubeconfig(&example.name),
        state.kubeconfig(),
    ] {
        let _ = std::fs::remove_file(stale);
    }
    let log =
        File::create(state.log()).with_context(|| format!("creating {}", state.log().display()))?;
    let mut daemon = Command::new(bin.join(DAEMON));
    daemon
        .current_dir(root)
        .arg("--state-dir")
        .arg(&state.dir)
        .arg("--controller")
        .arg(bin.join("benchcluster-controller"))
        .arg("--apply")
        .arg(&manifest)
        .arg("--example")
        .arg(example.key())
        .arg("--ssh-secret")
        .arg(&example.ssh_secret)
        .arg("--netns")
        .arg(NETNS)
        .env(K8S_BIN_ENV, &bin_dir)
        .env(KUBE_IMAGE_ENV, &image)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C on `up` (or on the shell later) does not
        // reach it. `down` stops it.
        .process_group(0);
    for volume in &example.volumes {
        daemon.arg("--volume").arg(volume);
    }
    let mut child = daemon.spawn().context("starting benchcluster-sandbox")?;
    std::fs::write(state.pid(), format!("{}\n", child.id()))?;
    println!(
        "started {DAEMON} (pid {}), log {}",
        child.id(),
        state.log().display()
    );

    // 1. The sandbox, the API server and the controller.
    let deadline = Instant::now() + START_DEADLINE;
    while !state.env().exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{DAEMON} exited ({status}) before it was up; its log:\n{}",
                tail(&state.log(), 40)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{DAEMON} was not up after {START_DEADLINE:?} (it is still running; \
                 `cargo xtask down` stops it); its log:\n{}",
                tail(&state.log(), 40)
            );
        }
        std::thread::sleep(POLL);
    }
    println!(
        "sandbox, API server and controller up after {:.0?}; waiting for \
         bc/{} (namespace {}) to be Ready (minutes under software emulation)",
        started.elapsed(),
        example.name,
        example.namespace
    );

    // 2. The BenchCluster: progress lines as `kubectl get bc -o wide` changes.
    let kubectl = bin_dir.join("kubectl");
    let deadline = Instant::now() + READY_DEADLINE;
    let mut last = String::new();
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "{DAEMON} exited ({status}); its log:\n{}",
                tail(&state.log(), 40)
            );
        }
        let line = get_example(&kubectl, &state.kubeconfig(), &example, &["-o", PROGRESS])
            .unwrap_or_default();
        if !line.is_empty() && line != last {
            println!("  [{:>5.0?}] {line}", started.elapsed());
            last = line;
        }
        if ready(&kubectl, &state.kubeconfig(), &example) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "bc/{} was not Ready after {READY_DEADLINE:?} (the sandbox keeps running: \
                 `kubectl describe {}`, {}; `cargo xtask down` removes it)",
                example.name,
                kubectl_ref(&example.namespace, &example.name),
                state.controller_log().display()
            );
        }
        std::thread::sleep(POLL);
    }
    println!(
        "bc/{} Ready {:.0?} after `cargo xtask up` started",
        example.name,
        started.elapsed()
    );
    write_guest_kubeconfig(&kubectl, &state, &example)?;
    instructions(&state, &bin_dir, &example.namespace, &example.name)
}

pub(crate) fn down(root: &Path) -> anyhow::Result<()> {
    let state = State::new(root);
    let started = Instant::now();
    match state.running() {
        Some(pid) => {
            println!("stopping {DAEMON} (pid {pid}): it destroys the VMs and removes the sandbox");
            signal("TERM", pid)?;
            let deadline = Instant::now() + STOP_DEADLINE;
            while alive(pid) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(200));
            }
            if alive(pid) {
                println!("still running after {STOP_DEADLINE:?}; killing it");
                signal("KILL", pid)?;
            }
        }
        None => println!("no {DAEMON} is running"),
    }
    // What a killed daemon could not remove itself.
    if Path::new("/run/netns").join(NETNS).exists() {
        println!("removing the network namespace {NETNS} and what runs in it");
        let pids = Command::new("ip")
            .args(["netns", "pids", NETNS])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        for pid in pids.split_whitespace() {
            let _ = Command::new("kill").args(["-KILL", pid]).status();
        }
        step({
            let mut delete = Command::new("ip");
            delete.args(["netns", "delete", NETNS]);
            delete
        })?;
    }
    if state.dir.exists() {
        std::fs::remove_dir_all(&state.dir)
            .with_context(|| format!("removing {}", state.dir.display()))?;
    }
    println!("down in {:.1?}", started.elapsed());
    Ok(())
}

fn signal(name: &str, pid: u32) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !status.success() && alive(pid) {
        bail!("kill -{name} {pid} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `kubectl --kubeconfig <kubeconfig> args...`'s stdout, if it succeeded.
fn kubectl_output(kubectl: &Path, kubeconfig: &Path, args: &[&str]) -> Option<String> {
    let output = Command::new(kubectl)
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .arg(KUBECTL_TIMEOUT)
        .args(args)
        .env_remove("KUBECONFIG")
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    output
        .status
        .success()
        .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
}

/// `kubectl get bc <example> output...`'s stdout, if it succeeded.
fn get_example(
    kubectl: &Path,
    kubeconfig: &Path,
    example: &Example,
    output: &[&str],
) -> Option<String> {
    let mut args = vec!["get", "bc", &example.name, "-n", &example.namespace];
    args.extend_from_slice(output);
    kubectl_output(kubectl, kubeconfig, &args)
}

fn ready(kubectl: &Path, kubeconfig: &Path, example: &Example) -> bool {
    let jsonpath = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
    get_example(kubectl, kubeconfig, example, &["-o", jsonpath]).is_some_and(|s| s.trim() == "True")
}

/// The guest cluster's admin kubeconfig from the `<name>-kubeconfig` Secret, into a
/// file only root reads.
fn write_guest_kubeconfig(kubectl: &Path, state: &State, example: &Example) -> anyhow::Result<()> {
    let secret = format!("{}-kubeconfig", example.name);
    let template = format!("go-template={{{{index .data \"{KUBECONFIG_KEY}\" | base64decode}}}}");
    let text = kubectl_output(
        kubectl,
        &state.kubeconfig(),
        &[
            "get",
            "secret",
            &secret,
            "-n",
            &example.namespace,
            "-o",
            &template,
        ],
    )
    .ok_or_else(|| anyhow!("cannot read Secret {}/{secret}", example.namespace))?;
    let path = state.guest_kubeconfig(&example.name);
    {
        use std::io::Write as _;
        use std::os::unix::fs::OpenOptionsExt as _;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        file.write_all(text.as_bytes())?;
    }
    Ok(())
}

fn instructions(state: &State, bin_dir: &Path, namespace: &str, name: &str) -> anyhow::Result<()> {
    let kubectl = bin_dir.join("kubectl");
    let guest = state.guest_kubeconfig(name);
    let bc = kubectl_ref(namespace, name);
    let guest_line = if guest.exists() {
        format!(
            "  ip netns exec {NETNS} {kubectl} --kubeconfig {guest} get nodes -o wide\n\
             \x20   (the guest cluster: its API is on the VMs' network, inside the namespace)\n",
            kubectl = kubectl.display(),
            guest = guest.display(),
        )
    } else {
        String::new()
    };
    println!(
        "
The sandbox runs in the background (network namespace {NETNS}; VMs under software emulation).

  source {env}        # KUBECONFIG for the management API, kubectl on PATH
  kubectl get {bc} -o wide
  kubectl wait --for=condition=Ready {bc} --timeout=30m
  kubectl scale {bc} --replicas=3            # the default pool; or edit spec.workers.replicas
  kubectl describe {bc}                      # conditions, per-node phase timings, events
{guest_line}
  controller log:   {controller_log}
  sandbox log:      {log}
  metrics:          ip netns exec {NETNS} curl -s 127.0.0.1:8080/metrics
  tear down:        cargo xtask down
",
        env = state.env().display(),
        controller_log = state.controller_log().display(),
        log = state.log().display(),
    );
    Ok(())
}

/// The last `lines` lines of a log file.
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_and_the_e2e_cluster_are_read() -> anyhow::Result<()> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let volumes = vec![
            "benchcluster-master.qcow2".to_owned(),
            "benchcluster-worker.qcow2".to_owned(),
        ];
        for (file, name) in [(DEFAULT_EXAMPLE, "example"), ("e2e/cluster.yaml", "e2e")] {
            let example = Example::read(&root.join(file))?;
            assert_eq!(example.name, name, "{file}");
            assert_eq!(example.namespace, "default", "{file}");
            assert_eq!(example.volumes, volumes, "{file}");
            assert_eq!(example.ssh_secret, "default/benchcluster-ssh", "{file}");
        }
        Ok(())
    }

    #[test]
    fn every_volume_and_the_namespace_are_read_once() {
        let text = "
kind: BenchCluster
metadata: {name: a}
spec:
  controlPlane: {image: {volume: cp.qcow2}}
  workers: {replicas: 0, image: {volume: w.qcow2}}
  pools:
    - {name: x, image: {volume: w.qcow2}}
    - {name: y, image: {volume: gpu.qcow2}}
  ssh: {keySecret: {name: key}}
";
        let example = Example::parse(text).ok();
        assert_eq!(
            example,
            Some(Example {
                name: "a".into(),
                namespace: "default".into(),
                volumes: vec!["cp.qcow2".into(), "w.qcow2".into(), "gpu.qcow2".into()],
                ssh_secret: "default/key".into(),
            })
        );
        let other = text.replace("{name: a}", "{name: a, namespace: bench}");
        let example = Example::parse(&other).ok();
        assert_eq!(example.map(|e| e.ssh_secret), Some("bench/key".to_owned()));
        assert!(Example::parse(&text.replace("BenchCluster", "Secret")).is_err());
    }

    #[test]
    fn env_values_are_read_with_or_without_export() {
        let text = "# comment\nexport KUBECONFIG=/a/kubeconfig\nBENCHCLUSTER_EXAMPLE=default/e2e\n";
        assert_eq!(env_value(text, "KUBECONFIG"), Some("/a/kubeconfig"));
        assert_eq!(env_value(text, EXAMPLE_ENV), Some("default/e2e"));
        assert_eq!(env_value(text, "PATH"), None);
    }
}
