//! `cargo xtask up` and `cargo xtask down`: the local sandbox.
//!
//! `up` builds what is missing, then starts `benchcluster-sandbox` (e2e/src/bin) as a
//! daemon of its own process group, which brings up libvirtd in a network namespace, a
//! kube-apiserver, the controller and the example BenchCluster (see its docs). `up`
//! waits until that BenchCluster is Ready, printing its progress, writes the guest
//! cluster's kubeconfig next to the management one, and prints how to use both. Run
//! again, it only prints that. `down` sends the daemon SIGTERM and waits until it has
//! torn everything down.

use std::fs::File;
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};

use super::{INSTALL_DEPS, K8S_BIN_ENV, KUBE_IMAGE_ENV, cargo, k8s_bin_dir, kube_image, step};

/// The network namespace the sandbox creates (`ip netns exec` it to reach the VMs).
const NETNS: &str = "benchcluster-up";
const EXAMPLE: &str = "manifests/examples/benchcluster.yaml";
/// The example's name and namespace.
const EXAMPLE_NAME: &str = "example";
const EXAMPLE_NAMESPACE: &str = "default";
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
/// One progress line: Ready, workers Ready of desired, the Ready condition's reason and
/// message (which names the node holding things up).
const PROGRESS: &str = "jsonpath=Ready={.status.conditions[?(@.type==\"Ready\")].status} \
    workers={.status.readyWorkers}/{.spec.workers.replicas} \
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
    fn guest_kubeconfig(&self) -> PathBuf {
        self.dir.join(format!("{EXAMPLE_NAME}.kubeconfig"))
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

pub(crate) fn up(root: &Path) -> anyhow::Result<()> {
    let state = State::new(root);
    if let Some(pid) = state.running() {
        println!("the sandbox is already running (pid {pid})");
        let bin_dir = k8s_bin_dir(root)?;
        return instructions(&state, &bin_dir);
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
    for stale in [state.env(), state.guest_kubeconfig(), state.kubeconfig()] {
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
        .arg(root.join(EXAMPLE))
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
         bc/{EXAMPLE_NAME} to be Ready (minutes under software emulation)",
        started.elapsed()
    );

    // 2. The example BenchCluster: progress lines as `kubectl get bc -o wide` changes.
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
        let line =
            get_example(&kubectl, &state.kubeconfig(), &["-o", PROGRESS]).unwrap_or_default();
        if !line.is_empty() && line != last {
            println!("  [{:>5.0?}] {line}", started.elapsed());
            last = line;
        }
        if ready(&kubectl, &state.kubeconfig()) {
            break;
        }
        if Instant::now() > deadline {
            bail!(
                "bc/{EXAMPLE_NAME} was not Ready after {READY_DEADLINE:?} (the sandbox keeps \
                 running: `kubectl describe bc {EXAMPLE_NAME}`, {}; `cargo xtask down` \
                 removes it)",
                state.controller_log().display()
            );
        }
        std::thread::sleep(POLL);
    }
    println!(
        "bc/{EXAMPLE_NAME} Ready {:.0?} after `cargo xtask up` started",
        started.elapsed()
    );
    write_guest_kubeconfig(&kubectl, &state)?;
    instructions(&state, &bin_dir)
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
fn get_example(kubectl: &Path, kubeconfig: &Path, output: &[&str]) -> Option<String> {
    let mut args = vec!["get", "bc", EXAMPLE_NAME, "-n", EXAMPLE_NAMESPACE];
    args.extend_from_slice(output);
    kubectl_output(kubectl, kubeconfig, &args)
}

fn ready(kubectl: &Path, kubeconfig: &Path) -> bool {
    let jsonpath = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
    get_example(kubectl, kubeconfig, &["-o", jsonpath]).is_some_and(|s| s.trim() == "True")
}

/// The guest cluster's admin kubeconfig from the `<name>-kubeconfig` Secret, into a
/// file only root reads.
fn write_guest_kubeconfig(kubectl: &Path, state: &State) -> anyhow::Result<()> {
    let secret = format!("{EXAMPLE_NAME}-kubeconfig");
    let template = format!("go-template={{{{index .data \"{KUBECONFIG_KEY}\" | base64decode}}}}");
    let text = kubectl_output(
        kubectl,
        &state.kubeconfig(),
        &[
            "get",
            "secret",
            &secret,
            "-n",
            EXAMPLE_NAMESPACE,
            "-o",
            &template,
        ],
    )
    .ok_or_else(|| anyhow!("cannot read Secret {EXAMPLE_NAMESPACE}/{secret}"))?;
    let path = state.guest_kubeconfig();
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

fn instructions(state: &State, bin_dir: &Path) -> anyhow::Result<()> {
    let kubectl = bin_dir.join("kubectl");
    let guest = state.guest_kubeconfig();
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
  kubectl get bc -o wide
  kubectl wait --for=condition=Ready bc/{EXAMPLE_NAME} --timeout=30m
  kubectl scale bc/{EXAMPLE_NAME} --replicas=3            # or edit spec.workers.replicas
  kubectl describe bc/{EXAMPLE_NAME}                      # conditions, per-node phase timings, events
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
