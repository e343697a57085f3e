//! Project tasks: `cargo xtask <task>` (alias in `.cargo/config.toml`).
//!
//! ```text
//! cargo xtask crd [--check]          write manifests/crd.yaml from crd/src, or check it is current
//! cargo xtask test unit              tests that need nothing outside the process
//! cargo xtask test api [--test-threads N]
//!                                    the api tier: a real kube-apiserver + etcd on loopback;
//!                                    every e2e/tests/*.rs whose first line is `//! api tier: ...`
//! cargo xtask test vm                the vm tier (root, libvirtd, qemu): builds the guest image
//!                                    if not cached, then every e2e/tests/*.rs whose first line
//!                                    is `//! vm tier...`, one test at a time
//! cargo xtask test e2e [--scenario NAME]... [--on-up]
//!                                    the e2e tier (root): kubeadm for real in VMs; builds the
//!                                    e2e image if not cached, then every `//! e2e tier` file;
//!                                    --scenario runs only the named scenarios (repeatable),
//!                                    --on-up runs them on the cluster `up` left running
//!                                    (no image build, no cluster of its own)
//! cargo xtask test all               every tier: unit, api, vm, e2e (root for the last two)
//! cargo xtask bench                  the benchmarks: scale (api tier) and vm (real VMs)
//! cargo xtask lint                   rustfmt and clippy, warnings denied
//! cargo xtask up [FILE]              the local sandbox (root): installs the Debian packages,
//!                                    builds what is missing, starts libvirtd, an API server and
//!                                    the controller, applies the BenchCluster of FILE (default
//!                                    manifests/examples/benchcluster.yaml; e2e/cluster.yaml is
//!                                    the e2e tier's) and waits for it to be Ready; leaves it all
//!                                    running
//! cargo xtask down                   stops what `up` started and removes it
//! ```
//!
//! Every command is printed before it runs; a failing command's exit code is ours.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::Instant;

use anyhow::{Context as _, anyhow, bail};

mod up;

/// Where `cargo xtask crd` writes the CRD, relative to the workspace root.
const CRD_MANIFEST: &str = "manifests/crd.yaml";
/// Builds (or finds in its cache) kube-apiserver, etcd and kubectl; prints their directory.
const BUILD_K8S: &str = "e2e/hack/build-k8s.sh";
/// Read by the e2e harness instead of running BUILD_K8S itself.
const K8S_BIN_ENV: &str = "BENCHCLUSTER_K8S_BIN";
/// Set to 1 to let the vm tier's tests run instead of skipping themselves.
const VM_TESTS_ENV: &str = "BENCHCLUSTER_VM_TESTS";
/// Builds (or finds in its cache) the vm tier's Debian guest image; prints its path.
const BUILD_GUEST_IMAGE: &str = "e2e/hack/build-guest-image.sh";
/// Read by the vm tier's sandbox instead of running BUILD_GUEST_IMAGE itself.
const GUEST_IMAGE_ENV: &str = "BENCHCLUSTER_GUEST_IMAGE";
/// Set to 1 to let the e2e tier's test run instead of skipping itself.
const E2E_TESTS_ENV: &str = "BENCHCLUSTER_E2E_TESTS";
/// The e2e scenarios to run, comma-separated (unset: all).
const E2E_SCENARIOS_ENV: &str = "BENCHCLUSTER_E2E_SCENARIOS";
/// The state directory of the sandbox `cargo xtask up` left running: the e2e tier runs
/// on its cluster instead of forming one.
const E2E_ON_UP_ENV: &str = "BENCHCLUSTER_E2E_ON_UP";
/// Builds (or finds in its cache) the e2e image: containerd, kubeadm, kubelet and the
/// control-plane images preloaded; prints its path.
const BUILD_KUBE_IMAGE: &str = "e2e/hack/build-kube-image.sh";
/// Read by the e2e tier and by `benchcluster-sandbox` instead of running BUILD_KUBE_IMAGE.
const KUBE_IMAGE_ENV: &str = "BENCHCLUSTER_KUBE_IMAGE";
/// Installs the Debian packages (one list, shared with .ci/run).
const INSTALL_DEPS: &str = "e2e/hack/install-deps.sh";
/// The e2e crate's integration tests, relative to the workspace root.
const E2E_TESTS: &str = "e2e/tests";
/// The api tier's tests wait on the server, not the CPU, and share one server per test
/// binary: more threads than the machine's 2 cores keep the tier short.
const DEFAULT_API_TEST_THREADS: u32 = 4;

const USAGE: &str = "usage: cargo xtask <task>

  crd [--check]               write manifests/crd.yaml from crd/src (--check: fail if it differs)
  test unit                   unit tests, doc tests (nothing outside the process)
  test api [--test-threads N] api tier: kube-apiserver + etcd on loopback (builds them on first use)
  test vm                     vm tier: real VMs in a network namespace (root, libvirtd, qemu;
                              builds the guest image on first use)
  test e2e [--scenario NAME]... [--on-up]
                              e2e tier: kubeadm, kubelet and containerd in the VMs (root;
                              builds the e2e image on first use); --scenario NAME runs only
                              that scenario (repeatable: pools, outage, rejoin, scale, delete);
                              --on-up runs on the cluster `up e2e/cluster.yaml` left running
  test all [--test-threads N] every tier: unit, api, vm, e2e (the last two need root)
  bench                       benchmarks: scale (api tier) and vm (real VMs), printed figures
  lint                        cargo fmt --check, cargo clippy -D warnings
  up [FILE]                   the local sandbox with the BenchCluster of FILE, left running
                              (default manifests/examples/benchcluster.yaml)
  down                        stop and remove what `up` started";

/// A command that ran and failed; its exit code becomes ours.
#[derive(Debug)]
struct Failed {
    command: String,
    code: Option<i32>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` failed with exit code {code}", self.command),
            None => write!(f, "`{}` was killed by a signal", self.command),
        }
    }
}

impl std::error::Error for Failed {}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("xtask: {error:#}");
            let code = error
                .downcast_ref::<Failed>()
                .and_then(|f| f.code)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|c| *c != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}

fn run(args: &[&str]) -> anyhow::Result<()> {
    let root = workspace_root()?;
    if let ["test", ..] = args {
        // A no-op when the Debian packages are there; installs them as root, else
        // names the missing ones.
        step(Command::new(root.join(INSTALL_DEPS)))?;
    }
    match args {
        ["crd"] => crd_write(&root),
        ["crd", "--check"] => crd_check(&root),
        ["test", "unit"] => test_unit(&root),
        ["test", "api", rest @ ..] => test_api(&root, test_threads(rest)?),
        ["test", "all", rest @ ..] => {
            let threads = test_threads(rest)?;
            test_unit(&root)?;
            test_api(&root, threads)?;
            test_vm(&root)?;
            test_e2e(&root, &E2eOptions::default())
        }
        ["test", "vm"] => test_vm(&root),
        ["test", "e2e", rest @ ..] => test_e2e(&root, &E2eOptions::parse(rest)?),
        ["bench"] => bench(&root),
        ["up"] => up::up(&root, None),
        ["up", file] => up::up(&root, Some(file)),
        ["down"] => up::down(&root),
        ["lint"] => lint(&root),
        ["help" | "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => bail!("unknown task {:?}\n{USAGE}", args.join(" ")),
    }
}

fn test_threads(args: &[&str]) -> anyhow::Result<u32> {
    match args {
        [] => Ok(DEFAULT_API_TEST_THREADS),
        ["--test-threads", n] => n
            .parse()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| anyhow!("--test-threads wants a positive number, not {n:?}")),
        _ => bail!("unexpected arguments {args:?}\n{USAGE}"),
    }
}

/// `cargo xtask test e2e`'s options.
#[derive(Debug, Default, PartialEq)]
struct E2eOptions {
    /// Only these scenarios (empty: all).
    scenarios: Vec<String>,
    /// On the cluster `cargo xtask up` left running.
    on_up: bool,
}

impl E2eOptions {
    fn parse(args: &[&str]) -> anyhow::Result<Self> {
        let mut options = Self::default();
        let mut args = args.iter();
        while let Some(arg) = args.next() {
            match *arg {
                "--scenario" => {
                    let name = args
                        .next()
                        .filter(|n| !n.is_empty() && !n.starts_with('-') && !n.contains(','))
                        .ok_or_else(|| anyhow!("--scenario wants a scenario's name\n{USAGE}"))?;
                    options.scenarios.push((*name).to_owned());
                }
                "--on-up" => options.on_up = true,
                _ => bail!("unexpected argument {arg:?} to `test e2e`\n{USAGE}"),
            }
        }
        Ok(options)
    }
}

fn workspace_root() -> anyhow::Result<PathBuf> {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_owned)
        .ok_or_else(|| anyhow!("xtask is not inside a workspace"))
}

/// The cargo that runs us (so `cargo +toolchain xtask` stays on that toolchain).
fn cargo(root: &Path) -> Command {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| OsString::from("cargo"));
    let mut command = Command::new(cargo);
    command.current_dir(root);
    command
}

fn describe(command: &Command) -> String {
    let program = Path::new(command.get_program());
    let program = match (program.file_name(), command.get_current_dir()) {
        // $CARGO is an absolute path into the toolchain; "cargo" is what a person types.
        (Some(name), _) if name == "cargo" => "cargo".to_owned(),
        (_, Some(dir)) => program
            .strip_prefix(dir)
            .unwrap_or(program)
            .display()
            .to_string(),
        _ => program.display().to_string(),
    };
    let args: Vec<String> = command
        .get_args()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let envs: Vec<String> = command
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), v?.to_string_lossy())))
        .collect();
    [envs, vec![program], args].concat().join(" ")
}

/// Prints the command, runs it with our stdout and stderr, and fails if it fails.
fn step(mut command: Command) -> anyhow::Result<()> {
    let text = describe(&command);
    println!("+ {text}");
    let start = Instant::now();
    let status = command
        .status()
        .with_context(|| format!("cannot run `{text}`"))?;
    println!("  ({text}: {:.1}s)", start.elapsed().as_secs_f64());
    if status.success() {
        Ok(())
    } else {
        Err(Failed {
            command: text,
            code: status.code(),
        }
        .into())
    }
}

/// Like [`step`] but returns the command's stdout (stderr still goes to ours).
fn step_output(mut command: Command) -> anyhow::Result<String> {
    let text = describe(&command);
    println!("+ {text}");
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("cannot run `{text}`"))?;
    if !output.status.success() {
        return Err(Failed {
            command: text,
            code: output.status.code(),
        }
        .into());
    }
    String::from_utf8(output.stdout).with_context(|| format!("`{text}` printed non-UTF-8"))
}

fn generated_crd(root: &Path) -> anyhow::Result<String> {
    let mut command = cargo(root);
    command.args(["run", "-q", "-p", "benchcluster-crd", "--bin", "crdgen"]);
    step_output(command)
}

fn crd_write(root: &Path) -> anyhow::Result<()> {
    let yaml = generated_crd(root)?;
    let path = root.join(CRD_MANIFEST);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
    println!("wrote {CRD_MANIFEST}");
    Ok(())
}

fn crd_check(root: &Path) -> anyhow::Result<()> {
    let generated = generated_crd(root)?;
    let path = root.join(CRD_MANIFEST);
    let committed = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            bail!("{CRD_MANIFEST} does not exist: run `cargo xtask crd` and commit it")
        }
        Err(error) => return Err(error).context(format!("reading {}", path.display())),
    };
    if committed == generated {
        println!("{CRD_MANIFEST} is up to date");
        return Ok(());
    }
    bail!(
        "{CRD_MANIFEST} differs from what crd/src generates ({}): \
         run `cargo xtask crd` and commit the result",
        first_difference(&committed, &generated)
    )
}

/// Where two texts first differ, for the error message.
fn first_difference(committed: &str, generated: &str) -> String {
    let mut committed_lines = committed.lines();
    let mut generated_lines = generated.lines();
    let mut line = 1;
    loop {
        match (committed_lines.next(), generated_lines.next()) {
            (Some(a), Some(b)) if a == b => line += 1,
            (Some(a), Some(b)) => {
                return format!("line {line}: committed {a:?}, generated {b:?}");
            }
            (Some(a), None) => return format!("line {line}: committed has extra {a:?}"),
            (None, Some(b)) => return format!("line {line}: generated has extra {b:?}"),
            (None, None) => return "they differ in line endings or a final newline".into(),
        }
    }
}

fn test_unit(root: &Path) -> anyhow::Result<()> {
    // --lib --bins: every crate's own unit tests, including the e2e harness's (which
    // need only bash), but none of the integration tests under e2e/tests.
    let mut unit = cargo(root);
    unit.args(["test", "--workspace", "--lib", "--bins"]);
    step(unit)?;
    // The controller's stage tests (controller/tests): whole passes and single stages on
    // the testkit's in-memory hypervisor, guest and API.
    let mut stages = cargo(root);
    stages.args(["test", "-p", "benchcluster-controller", "--test", "*"]);
    step(stages)?;
    let mut doc = cargo(root);
    doc.args([
        "test",
        "--doc",
        "-p",
        "benchcluster-crd",
        "-p",
        "benchcluster-controller",
    ]);
    step(doc)
}

/// kube-apiserver, etcd and kubectl: from $BENCHCLUSTER_K8S_BIN, else built (or found
/// in the cache) by BUILD_K8S.
fn k8s_bin_dir(root: &Path) -> anyhow::Result<PathBuf> {
    let bin_dir = match std::env::var_os(K8S_BIN_ENV) {
        Some(dir) => {
            println!("using {K8S_BIN_ENV}={}", dir.to_string_lossy());
            PathBuf::from(dir)
        }
        None => {
            println!(
                "building kube-apiserver, etcd and kubectl from e2e/versions.env if not cached \
                 (the first build takes ~6 minutes)"
            );
            let mut build = Command::new(root.join(BUILD_K8S));
            build.current_dir(root);
            let start = Instant::now();
            let out = step_output(build)?;
            let dir = out
                .lines()
                .rev()
                .map(str::trim)
                .find(|l| !l.is_empty())
                .ok_or_else(|| anyhow!("{BUILD_K8S} printed no directory"))?;
            println!(
                "  ({BUILD_K8S}: {:.1}s) -> {dir}",
                start.elapsed().as_secs_f64()
            );
            PathBuf::from(dir)
        }
    };
    Ok(bin_dir)
}

/// The vm tier's guest image: from $BENCHCLUSTER_GUEST_IMAGE, else built (or found in
/// the cache) by BUILD_GUEST_IMAGE.
fn guest_image(root: &Path) -> anyhow::Result<PathBuf> {
    image(
        root,
        GUEST_IMAGE_ENV,
        BUILD_GUEST_IMAGE,
        "the vm tier's guest image (debootstrap; ~2 minutes the first time, with Debian's \
         packages still to download a few more)",
    )
}

/// The e2e image: from $BENCHCLUSTER_KUBE_IMAGE, else built (or found in the cache) by
/// BUILD_KUBE_IMAGE.
fn kube_image(root: &Path) -> anyhow::Result<PathBuf> {
    image(
        root,
        KUBE_IMAGE_ENV,
        BUILD_KUBE_IMAGE,
        "the e2e image (the guest image plus containerd, kubeadm, kubelet and the \
         control-plane images, built from the pinned Go modules; ~5 minutes the first time)",
    )
}

/// The image file `env` names, else the path `script` prints last (building the image
/// if its cache has none), with the time it took.
fn image(root: &Path, env: &str, script: &str, what: &str) -> anyhow::Result<PathBuf> {
    if let Some(image) = std::env::var_os(env) {
        println!("using {env}={}", image.to_string_lossy());
        return Ok(PathBuf::from(image));
    }
    println!("building {what} if not cached");
    let mut build = Command::new(root.join(script));
    build.current_dir(root);
    let start = Instant::now();
    let out = step_output(build)?;
    let image = out
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .ok_or_else(|| anyhow!("{script} printed no path"))?;
    println!(
        "  ({script}: {:.1}s) -> {image}",
        start.elapsed().as_secs_f64()
    );
    Ok(PathBuf::from(image))
}

fn test_api(root: &Path, threads: u32) -> anyhow::Result<()> {
    let bin_dir = k8s_bin_dir(root)?;

    println!("+ cargo xtask crd --check");
    crd_check(root)?;

    let tests = tier_tests(&root.join(E2E_TESTS), "api")?;
    let mut test = cargo(root);
    test.env(K8S_BIN_ENV, &bin_dir)
        .args(["test", "-p", "benchcluster-e2e"]);
    for name in &tests {
        test.args(["--test", name]);
    }
    test.arg("--").arg(format!("--test-threads={threads}"));
    step(test)
}

fn test_vm(root: &Path) -> anyhow::Result<()> {
    let start = Instant::now();
    // The API server runs inside the sandbox's namespace, next to the controller.
    let bin_dir = k8s_bin_dir(root)?;
    let image = guest_image(root)?;
    let mut test = cargo(root);
    // The vm tests skip themselves unless this is set, so a plain `cargo test` on a
    // machine without libvirtd stays green.
    test.env(VM_TESTS_ENV, "1")
        .env(GUEST_IMAGE_ENV, &image)
        .env(K8S_BIN_ENV, &bin_dir)
        .args(["test", "-p", "benchcluster-e2e"]);
    for name in tier_tests(&root.join(E2E_TESTS), "vm")? {
        test.args(["--test", &name]);
    }
    // Guests under software emulation are CPU-bound: one test at a time.
    test.args(["--", "--test-threads=1"]);
    step(test)?;
    println!(
        "vm tier done in {:.1}s (image included)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn test_e2e(root: &Path, options: &E2eOptions) -> anyhow::Result<()> {
    let start = Instant::now();
    // Checked first: without a running sandbox there is nothing to build for.
    let on_up = if options.on_up {
        Some(up::running_state_dir(root)?)
    } else {
        None
    };
    let bin_dir = k8s_bin_dir(root)?;
    let mut test = cargo(root);
    test.env(E2E_TESTS_ENV, "1").env(K8S_BIN_ENV, &bin_dir);
    match &on_up {
        // The up cluster's VMs boot from the image `up` gave them.
        Some(dir) => test.env(E2E_ON_UP_ENV, dir),
        None => test.env(KUBE_IMAGE_ENV, kube_image(root)?),
    };
    if !options.scenarios.is_empty() {
        test.env(E2E_SCENARIOS_ENV, options.scenarios.join(","));
    }
    test.args(["test", "-p", "benchcluster-e2e"]);
    for name in tier_tests(&root.join(E2E_TESTS), "e2e")? {
        test.args(["--test", &name]);
    }
    // One test at a time (emulated guests are CPU-bound), its output shown as it goes:
    // the phase timings it prints are part of what this tier reports.
    test.args(["--", "--test-threads=1", "--nocapture"]);
    step(test)?;
    let what = if on_up.is_some() {
        "on the up cluster"
    } else {
        "image included"
    };
    println!(
        "e2e tier done in {:.1}s ({what})",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The benchmarks, each printing its figures: `scale` on the api tier's test bed, `vm`
/// on real VMs in the sandbox (so this needs what `test vm` needs).
fn bench(root: &Path) -> anyhow::Result<()> {
    let bin_dir = k8s_bin_dir(root)?;
    let image = guest_image(root)?;
    let mut bench = cargo(root);
    bench
        .env(VM_TESTS_ENV, "1")
        .env(GUEST_IMAGE_ENV, &image)
        .env(K8S_BIN_ENV, &bin_dir)
        .args([
            "bench",
            "-p",
            "benchcluster-e2e",
            "--bench",
            "scale",
            "--bench",
            "vm",
        ]);
    step(bench)
}

/// The integration tests of one tier: each file in `dir` says its tier on its first line
/// (`//! api tier: ...`). A file that says none is an error, so no test file is
/// silently left out of every tier.
fn tier_tests(dir: &Path, tier: &str) -> anyhow::Result<Vec<String>> {
    let mut tests = Vec::new();
    let mut undeclared = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path
            .file_stem()
            .filter(|_| path.extension().is_some_and(|e| e == "rs"))
            .map(|n| n.to_string_lossy().into_owned())
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        match declared_tier(&text) {
            Some(t) if t == tier => tests.push(name),
            Some(_) => {}
            None => undeclared.push(path.display().to_string()),
        }
    }
    if !undeclared.is_empty() {
        bail!(
            "these test files do not start with `//! <tier> tier...` (api, vm or e2e): {}",
            undeclared.join(", ")
        );
    }
    if tests.is_empty() {
        bail!("no test file in {} declares the {tier} tier", dir.display());
    }
    tests.sort();
    Ok(tests)
}

/// `api` from a file starting `//! api tier: ...` (or `//! api tier smoke test: ...`).
fn declared_tier(text: &str) -> Option<&str> {
    let (tier, rest) = text
        .lines()
        .next()?
        .strip_prefix("//! ")?
        .split_once(" tier")?;
    let tier = tier.trim();
    let well_formed = !tier.is_empty()
        && !tier.contains(' ')
        && (rest.is_empty() || rest.starts_with(':') || rest.starts_with(' '));
    well_formed.then_some(tier)
}

fn lint(root: &Path) -> anyhow::Result<()> {
    let mut fmt = cargo(root);
    fmt.args(["fmt", "--all", "--", "--check"]);
    step(fmt)?;
    let mut clippy = cargo(root);
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    step(clippy)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_difference_names_the_line() {
        assert_eq!(
            first_difference("a\nb\nc\n", "a\nx\nc\n"),
            "line 2: committed \"b\", generated \"x\""
        );
        assert_eq!(
            first_difference("a\n", "a\nb\n"),
            "line 2: generated has extra \"b\""
        );
        assert_eq!(
            first_difference("a\n", "a"),
            "they differ in line endings or a final newline"
        );
    }

    #[test]
    fn the_tier_is_read_from_the_first_line() {
        assert_eq!(declared_tier("//! api tier: the CRD\n"), Some("api"));
        assert_eq!(
            declared_tier("//! vm tier: qemu\n//! api tier: no"),
            Some("vm")
        );
        assert_eq!(
            declared_tier("//! vm tier smoke test: the sandbox"),
            Some("vm")
        );
        assert_eq!(declared_tier("//! Tests of the api tier: no\n"), None);
        assert_eq!(declared_tier("//! api tiers: no\n"), None);
        assert_eq!(declared_tier("use std::fs;\n"), None);
        assert_eq!(declared_tier(""), None);
    }

    #[test]
    fn e2e_options_parse() {
        assert_eq!(E2eOptions::parse(&[]).ok(), Some(E2eOptions::default()));
        assert_eq!(
            E2eOptions::parse(&["--scenario", "pools", "--on-up", "--scenario", "scale"]).ok(),
            Some(E2eOptions {
                scenarios: vec!["pools".into(), "scale".into()],
                on_up: true,
            })
        );
        assert!(E2eOptions::parse(&["--scenario"]).is_err());
        assert!(E2eOptions::parse(&["--scenario", "--on-up"]).is_err());
        assert!(E2eOptions::parse(&["--scenario", "a,b"]).is_err());
        assert!(E2eOptions::parse(&["--bogus"]).is_err());
    }

    #[test]
    fn test_threads_defaults_and_parses() {
        assert_eq!(test_threads(&[]).ok(), Some(DEFAULT_API_TEST_THREADS));
        assert_eq!(test_threads(&["--test-threads", "2"]).ok(), Some(2));
        assert!(test_threads(&["--test-threads", "0"]).is_err());
        assert!(test_threads(&["--bogus"]).is_err());
    }
}
