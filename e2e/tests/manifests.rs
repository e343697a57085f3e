//! api tier: everything under `manifests/` against a real kube-apiserver.
//!
//! Each file, the kustomization and the examples go through `kubectl apply
//! --dry-run=server`, so the server's own schema, admission and strict field validation
//! judge them: a typo in a field name, a wrong type or an unknown kind fails here, not
//! on a user's cluster. The RBAC is then applied for real and probed with `kubectl auth
//! can-i` as the controller's ServiceAccount: it must allow what the controller does and
//! nothing else.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail, ensure};
use benchcluster_e2e::{TestApiServer, create_namespace};
use k8s_openapi::serde::Deserialize as _;
use serde_json::Value;

/// The namespace the manifests install the controller into.
const CONTROLLER_NAMESPACE: &str = "benchcluster-system";
const SERVICE_ACCOUNT: &str = "system:serviceaccount:benchcluster-system:benchcluster-controller";

fn manifests_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests")
}

/// The `.yaml` files directly in `dir`, sorted.
fn yaml_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// The manifests `kubectl apply -f` takes: every top-level file but the kustomization.
fn plain_manifests() -> anyhow::Result<Vec<PathBuf>> {
    let files: Vec<PathBuf> = yaml_files(&manifests_dir())?
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n != "kustomization.yaml"))
        .collect();
    ensure!(
        !files.is_empty(),
        "no manifests in {}",
        manifests_dir().display()
    );
    Ok(files)
}

/// Every YAML document in `text`, as JSON values; empty documents are skipped.
fn documents(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = Vec::new();
    for document in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(document)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn read_documents(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    documents(&text).with_context(|| format!("parsing {}", path.display()))
}

/// Runs kubectl against the test server; fails with its stderr if it fails.
fn kubectl(server: &TestApiServer, args: &[&str]) -> anyhow::Result<String> {
    let output = server.kubectl(args).output()?;
    ensure!(
        output.status.success(),
        "kubectl {} failed ({}): {}{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    Ok(String::from_utf8(output.stdout)?)
}

/// `kubectl apply --dry-run=server` of `target` (`-f <file>` or `-k <dir>`), checking
/// that the server, not only kubectl, saw every object.
fn dry_run(server: &TestApiServer, target: &[&str]) -> anyhow::Result<String> {
    let mut args = vec!["apply", "--dry-run=server", "--validate=strict"];
    args.extend_from_slice(target);
    let out = kubectl(server, &args)?;
    ensure!(
        !out.trim().is_empty() && out.lines().all(|l| l.contains("(server dry run)")),
        "kubectl apply {} did not report a server dry run for every object:\n{out}",
        target.join(" ")
    );
    Ok(out)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// Everything every test here needs: the shared server, the CRD, and the controller's
/// namespace created for real (a dry-run Namespace is not stored, so the namespaced
/// objects' dry runs would otherwise fail with NotFound). Done once per test binary, so
/// concurrent tests do not race to create the same namespace.
async fn server() -> anyhow::Result<&'static TestApiServer> {
    static READY: tokio::sync::OnceCell<Result<(), String>> = tokio::sync::OnceCell::const_new();
    let server = TestApiServer::shared().await?;
    let setup = READY
        .get_or_init(|| async {
            let result: anyhow::Result<()> = async {
                server.install_crd().await?;
                let namespace = manifests_dir().join("namespace.yaml");
                kubectl(
                    server,
                    &["apply", "--server-side", "-f", path_str(&namespace)?],
                )?;
                Ok(())
            }
            .await;
            result.map_err(|e| format!("{e:#}"))
        })
        .await;
    setup
        .as_ref()
        .map_err(|e| anyhow::anyhow!("setting up the manifests' namespace failed: {e}"))?;
    Ok(server)
}

/// Runs `body`, printing the server's logs if it fails.
async fn with_server<F, Fut>(body: F) -> anyhow::Result<()>
where
    F: FnOnce(&'static TestApiServer) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let server = server().await?;
    let result = body(server).await;
    if result.is_err() {
        server.dump_logs();
    }
    result
}

#[tokio::test]
async fn every_manifest_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    with_server(|server| async move {
        for file in plain_manifests()? {
            dry_run(server, &["-f", path_str(&file)?])
                .with_context(|| format!("{} does not apply", file.display()))?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_kustomization_lists_every_manifest() -> anyhow::Result<()> {
    let path = manifests_dir().join("kustomization.yaml");
    let kustomization = read_documents(&path)?;
    let listed: BTreeSet<String> = kustomization
        .first()
        .and_then(|k| k["resources"].as_array())
        .context("kustomization.yaml has no resources list")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    let present: BTreeSet<String> = plain_manifests()?
        .iter()
        .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
        .collect();
    ensure!(
        listed == present,
        "kustomization.yaml lists {listed:?} but manifests/ holds {present:?}"
    );
    Ok(())
}

#[tokio::test]
async fn the_kustomization_builds_and_passes_a_server_side_dry_run() -> anyhow::Result<()> {
    with_server(|server| async move {
        let dir = manifests_dir();
        let built = kubectl(server, &["kustomize", path_str(&dir)?])?;
        let objects = documents(&built)?;
        let kinds: BTreeSet<&str> = objects.iter().filter_map(|o| o["kind"].as_str()).collect();
        for kind in [
            "Namespace",
            "CustomResourceDefinition",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Deployment",
            "Service",
        ] {
            ensure!(
                kinds.contains(kind),
                "kustomize output has no {kind}: {kinds:?}"
            );
        }
        let cluster_scoped = [
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        ];
        for object in &objects {
            let kind = object["kind"].as_str().unwrap_or_default();
            let namespace = object["metadata"]["namespace"].as_str();
            if cluster_scoped.contains(&kind) {
                ensure!(namespace.is_none(), "{kind} has a namespace: {object:#}");
            } else {
                ensure!(
                    namespace == Some(CONTROLLER_NAMESPACE),
                    "{kind} {} is not in {CONTROLLER_NAMESPACE}",
                    object["metadata"]["name"]
                );
            }
        }
        dry_run(server, &["-k", path_str(&dir)?])?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn the_examples_pass_a_server_side_dry_run() -> anyhow::Result<()> {
    with_server(|server| async move {
        let client = server.client().await?;
        let ns = create_namespace(&client, "manifests-examples").await?;
        let mut examples = yaml_files(&manifests_dir().join("examples"))?;
        let names: Vec<String> = examples
            .iter()
            .filter_map(|p| p.file_name()?.to_str().map(str::to_owned))
            .collect();
        for wanted in ["small.yaml", "medium.yaml", "scheduler-benchmark.yaml"] {
            ensure!(
                names.iter().any(|n| n == wanted),
                "manifests/examples has no {wanted}: {names:?}"
            );
        }
        // The e2e tier's cluster, which `cargo xtask up e2e/cluster.yaml` applies too.
        examples.push(Path::new(env!("CARGO_MANIFEST_DIR")).join("cluster.yaml"));
        for example in &examples {
            // An example that names its namespace is applied there (kubectl refuses -n
            // with a different one); the others go into this test's namespace.
            let names_namespace = read_documents(example)?
                .iter()
                .any(|d| d["metadata"]["namespace"].is_string());
            let file = path_str(example)?;
            let target: Vec<&str> = if names_namespace {
                vec!["-f", file]
            } else {
                vec!["-n", ns.as_str(), "-f", file]
            };
            let out = dry_run(server, &target)
                .with_context(|| format!("{} does not apply", example.display()))?;
            ensure!(
                out.contains("benchcluster.benchcluster.dev/"),
                "{} holds no BenchCluster: {out}",
                example.display()
            );
        }
        Ok(())
    })
    .await
}

/// Every rule of every (Cluster)Role in rbac.yaml.
fn rbac_rules() -> anyhow::Result<Vec<Value>> {
    let mut rules = Vec::new();
    for object in read_documents(&manifests_dir().join("rbac.yaml"))? {
        if matches!(object["kind"].as_str(), Some("ClusterRole" | "Role")) {
            rules.extend(object["rules"].as_array().cloned().unwrap_or_default());
        }
    }
    ensure!(!rules.is_empty(), "rbac.yaml has no rules");
    Ok(rules)
}

#[tokio::test]
async fn the_rbac_has_no_wildcard_and_names_the_subresources() -> anyhow::Result<()> {
    let rules = rbac_rules()?;
    for rule in &rules {
        for field in ["apiGroups", "resources", "verbs", "resourceNames"] {
            for value in rule[field].as_array().into_iter().flatten() {
                ensure!(
                    value.as_str().is_some_and(|v| !v.contains('*')),
                    "wildcard in {field} of rule {rule}"
                );
            }
        }
        ensure!(
            rule.get("nonResourceURLs").is_none(),
            "the controller needs no non-resource URL: {rule}"
        );
    }
    let resources: BTreeSet<&str> = rules
        .iter()
        .flat_map(|r| r["resources"].as_array().into_iter().flatten())
        .filter_map(Value::as_str)
        .collect();
    for wanted in ["benchclusters/status", "benchclusters/finalizers"] {
        ensure!(
            resources.contains(wanted),
            "rbac.yaml does not name {wanted}"
        );
    }
    Ok(())
}

/// `kubectl auth can-i <args> --as <the controller>`: Ok(true) for yes, Ok(false) for no.
fn controller_can(server: &TestApiServer, args: &[&str]) -> anyhow::Result<bool> {
    let mut all = vec!["auth", "can-i"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["--as", SERVICE_ACCOUNT]);
    let output = server.kubectl(&all).output()?;
    let answer = String::from_utf8_lossy(&output.stdout).trim().to_owned();
    match (output.status.code(), answer.as_str()) {
        (Some(0), "yes") => Ok(true),
        (Some(1), a) if a.starts_with("no") => Ok(false),
        _ => bail!(
            "kubectl {} failed ({}): {answer} {}",
            all.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        ),
    }
}

#[tokio::test]
async fn the_controller_may_do_what_it_needs_and_nothing_more() -> anyhow::Result<()> {
    with_server(|server| async move {
        let rbac = manifests_dir().join("rbac.yaml");
        kubectl(server, &["apply", "--server-side", "-f", path_str(&rbac)?])?;

        let bc = "benchclusters.benchcluster.dev";
        let lease = "leases.coordination.k8s.io";
        let crd = "customresourcedefinitions.apiextensions.k8s.io";
        let ns = CONTROLLER_NAMESPACE;
        let allowed: &[&[&str]] = &[
            &["list", bc, "--all-namespaces"],
            &["watch", bc, "--all-namespaces"],
            &["get", bc, "-n", "team-a"],
            &["patch", bc, "-n", "team-a"],
            &["update", bc, "-n", "team-a"],
            &["patch", bc, "--subresource=status", "-n", "team-a"],
            &["update", bc, "--subresource=finalizers", "-n", "team-a"],
            &["get", "secrets", "-n", "team-a"],
            &["list", "secrets", "--all-namespaces"],
            &["watch", "secrets", "--all-namespaces"],
            &["create", "secrets", "-n", "team-a"],
            &["patch", "secrets", "-n", "team-a"],
            &["delete", "secrets", "-n", "team-a"],
            &["create", "events.events.k8s.io", "-n", "team-a"],
            &["patch", "events.events.k8s.io", "-n", "team-a"],
            &["create", lease, "-n", ns],
            &["get", &format!("{lease}/benchcluster-controller"), "-n", ns],
            // The elector watches its one Lease.
            &[
                "list",
                &format!("{lease}/benchcluster-controller"),
                "-n",
                ns,
            ],
            &[
                "watch",
                &format!("{lease}/benchcluster-controller"),
                "-n",
                ns,
            ],
            &[
                "update",
                &format!("{lease}/benchcluster-controller"),
                "-n",
                ns,
            ],
            // kube-lease-manager renews with PATCH.
            &[
                "patch",
                &format!("{lease}/benchcluster-controller"),
                "-n",
                ns,
            ],
            &["get", &format!("{crd}/benchclusters.benchcluster.dev")],
        ];
        let denied: &[&[&str]] = &[
            &["create", bc, "-n", "team-a"],
            &["delete", bc, "-n", "team-a"],
            &["update", bc, "--subresource=status", "-n", "team-a"],
            &["update", bc, "--subresource=scale", "-n", "team-a"],
            &["update", "secrets", "-n", "team-a"],
            &["deletecollection", "secrets", "-n", "team-a"],
            &["list", "pods", "--all-namespaces"],
            &["create", "pods/exec", "-n", ns],
            &["create", "events", "-n", "team-a"],
            &["create", lease, "-n", "team-a"],
            &["list", lease, "-n", ns],
            &["watch", &format!("{lease}/someone-else"), "-n", ns],
            &["update", &format!("{lease}/someone-else"), "-n", ns],
            &["patch", &format!("{lease}/someone-else"), "-n", ns],
            &["get", &format!("{crd}/someone-else.example.com")],
            &["list", crd],
            &["create", "clusterroles.rbac.authorization.k8s.io"],
            &["impersonate", "serviceaccounts", "-n", ns],
            &["*", "*", "--all-namespaces"],
        ];
        // RBAC objects take effect through the authorizer's informer: poll briefly
        // for the first permission before judging the rest.
        benchcluster_e2e::wait::until(
            "the controller's RBAC to take effect",
            std::time::Duration::from_secs(30),
            std::time::Duration::from_millis(200),
            || async { controller_can(server, allowed[0]).map(|yes| yes.then_some(())) },
        )
        .await?;
        let mut wrong = Vec::new();
        for args in allowed {
            if !controller_can(server, args)? {
                wrong.push(format!("denied but needed: {}", args.join(" ")));
            }
        }
        for args in denied {
            if controller_can(server, args)? {
                wrong.push(format!("allowed but not needed: {}", args.join(" ")));
            }
        }
        ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
        Ok(())
    })
    .await
}

/// The controller's Deployment as kustomize renders it.
fn deployment(server: &TestApiServer) -> anyhow::Result<Value> {
    let built = kubectl(server, &["kustomize", path_str(&manifests_dir())?])?;
    documents(&built)?
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .context("kustomize output has no Deployment")
}

#[tokio::test]
async fn the_deployment_is_locked_down_as_far_as_libvirt_allows() -> anyhow::Result<()> {
    let server = TestApiServer::shared().await?;
    let deployment = deployment(server)?;
    let pod = &deployment["spec"]["template"]["spec"];
    let containers = pod["containers"].as_array().context("no containers")?;
    ensure!(containers.len() == 1, "one container expected: {pod:#}");
    let container = &containers[0];
    let security = &container["securityContext"];

    ensure!(
        pod["hostNetwork"] == true,
        "hostNetwork: the VMs' network is the host's"
    );
    ensure!(
        pod["nodeSelector"]["benchcluster.dev/libvirt-host"] == "true",
        "not pinned to the libvirt host"
    );
    ensure!(deployment["spec"]["strategy"]["type"] == "Recreate");
    ensure!(pod["securityContext"]["runAsNonRoot"] == true);
    ensure!(
        pod["securityContext"]["runAsUser"]
            .as_i64()
            .is_some_and(|u| u != 0)
    );
    ensure!(security["readOnlyRootFilesystem"] == true);
    ensure!(security["allowPrivilegeEscalation"] == false);
    ensure!(security["capabilities"]["drop"] == serde_json::json!(["ALL"]));
    ensure!(
        security
            .get("capabilities")
            .and_then(|c| c.get("add"))
            .is_none()
    );
    ensure!(security["privileged"] != true);

    for (probe, path) in [("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")] {
        let get = &container[probe]["httpGet"];
        ensure!(get["path"] == path, "{probe} is not on {path}: {get}");
        let port = &get["port"];
        let port_is_8080 = port == 8080
            || container["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == *port && p["containerPort"] == 8080);
        ensure!(port_is_8080, "{probe} is not on port 8080: {get}");
    }
    for kind in ["requests", "limits"] {
        for resource in ["cpu", "memory"] {
            ensure!(
                container["resources"][kind][resource].is_string(),
                "no {kind}.{resource}"
            );
        }
    }

    let mounts = container["volumeMounts"].as_array().context("no mounts")?;
    let socket = mounts
        .iter()
        .find(|m| m["mountPath"] == "/var/run/libvirt/libvirt-sock")
        .context("the libvirt socket is not mounted")?;
    let volume = pod["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == socket["name"])
        .context("no volume for the libvirt socket")?;
    ensure!(
        volume["hostPath"]["path"] == "/var/run/libvirt/libvirt-sock"
            && volume["hostPath"]["type"] == "Socket",
        "the libvirt socket volume: {volume}"
    );
    let args: Vec<&str> = container["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let state_dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .context("no --state-dir")?;
    ensure!(
        mounts.iter().any(|m| m["mountPath"] == state_dir),
        "--state-dir={state_dir} is not a writable volume"
    );
    ensure!(args.contains(&"--leader-election"));
    Ok(())
}
