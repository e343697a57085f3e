//! api tier: the CRD from `manifests/crd.yaml` on a real kube-apiserver. The schema's
//! defaults, bounds and CEL rules are enforced by the server, not by our code, so only
//! a real server can show they work.
//!
//! Objects are written as JSON, the way `kubectl apply` sends a user's YAML, so the
//! tests exercise the schema rather than what the Rust types can express.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::future::Future;
use std::time::Duration;

use anyhow::{Context as _, anyhow, bail, ensure};
use benchcluster_crd::quantity::parse_bytes;
use benchcluster_crd::{BenchCluster, Firmware, TaintEffect};
use benchcluster_e2e::{TestApiServer, create_namespace, testbed, wait};
use kube::api::{Api, ApiResource, DynamicObject, PostParams};
use kube::core::Status;
use serde_json::{Value, json};

/// Everything a test gets: the shared server, a client, and a namespace of its own.
struct Env {
    server: &'static TestApiServer,
    client: kube::Client,
    ns: String,
}

impl Env {
    fn dynamic(&self) -> Api<DynamicObject> {
        Api::namespaced_with(
            self.client.clone(),
            &self.ns,
            &ApiResource::erase::<BenchCluster>(&()),
        )
    }

    fn typed(&self) -> Api<BenchCluster> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn create(&self, object: Value) -> kube::Result<DynamicObject> {
        let object: DynamicObject =
            serde_json::from_value(object).map_err(kube::Error::SerdeError)?;
        self.dynamic().create(&PostParams::default(), &object).await
    }

    /// Runs kubectl in this test's namespace; fails with its stderr if it fails.
    async fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["--namespace", self.ns.as_str()];
        all.extend_from_slice(args);
        let output = tokio::process::Command::from(self.server.kubectl(&all))
            .output()
            .await?;
        ensure!(
            output.status.success(),
            "kubectl {} failed ({}): {}",
            all.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
        Ok(String::from_utf8(output.stdout)?)
    }
}

/// Gives `body` a fresh namespace on the shared server with the CRD installed, and
/// prints the server's logs if it fails.
async fn with_env<F, Fut>(prefix: &str, body: F) -> anyhow::Result<()>
where
    F: FnOnce(Env) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let server = TestApiServer::shared().await?;
    let result = async {
        server.install_crd().await?;
        let client = server.client().await?;
        let ns = create_namespace(&client, prefix).await?;
        body(Env { server, client, ns }).await
    }
    .await;
    if result.is_err() {
        server.dump_logs();
    }
    result
}

/// A BenchCluster with every required field and no optional one.
fn minimal(name: &str) -> Value {
    json!({
        "apiVersion": "benchcluster.dev/v1alpha1",
        "kind": "BenchCluster",
        "metadata": {"name": name},
        "spec": {
            "controlPlane": {
                "cpus": 2,
                "memory": "4Gi",
                "disk": "40Gi",
                "image": {"volume": "master.qcow2"},
            },
            "workers": {
                "replicas": 1,
                "cpus": 2,
                "memory": "2Gi",
                "disk": "20Gi",
                "image": {"volume": "worker.qcow2"},
            },
            "network": {"name": "scheduler_benchmark_net"},
            "ssh": {"keySecret": {"name": "bench-ssh"}},
        },
    })
}

/// `object` with the member at `pointer` set to `value`; the member's parent must exist.
fn with(mut object: Value, pointer: &str, value: Value) -> Value {
    let (parent, key) = pointer
        .rsplit_once('/')
        .unwrap_or_else(|| panic!("{pointer} is not a JSON pointer"));
    object
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .unwrap_or_else(|| panic!("no object at {parent} in the test object"))
        .insert(key.to_owned(), value);
    object
}

/// The API server's 422 Invalid answer in `result`, or an error saying what came instead.
fn rejection<T: std::fmt::Debug>(result: kube::Result<T>, field: &str) -> anyhow::Result<Status> {
    let status = match result {
        Ok(accepted) => bail!("accepted, but {field} should have been rejected: {accepted:?}"),
        Err(kube::Error::Api(status)) => *status,
        Err(other) => bail!("expected a rejection naming {field}, got {other:#}"),
    };
    ensure!(
        status.code == 422 && status.reason == "Invalid",
        "expected 422 Invalid, got {} {}: {}",
        status.code,
        status.reason,
        status.message
    );
    Ok(status)
}

/// Checks that `status` has a cause for which `matches(field, message)` holds.
fn expect_cause(
    status: &Status,
    wanted: &str,
    matches: impl Fn(&str, &str) -> bool,
) -> anyhow::Result<()> {
    let causes = status
        .details
        .as_ref()
        .map(|d| d.causes.as_slice())
        .unwrap_or_default();
    ensure!(
        causes.iter().any(|c| matches(&c.field, &c.message)),
        "no cause {wanted}; the server said: {}\ncauses: {causes:#?}",
        status.message
    );
    Ok(())
}

/// Checks that `result` is the API server's 422 Invalid with a cause on `field` (as the
/// server spells it, for example `spec.workers.replicas`) whose message contains `says`.
fn expect_invalid<T: std::fmt::Debug>(
    result: kube::Result<T>,
    field: &str,
    says: &str,
) -> anyhow::Result<()> {
    let status = rejection(result, field)?;
    expect_cause(&status, &format!("on {field:?} saying {says:?}"), |f, m| {
        f == field && m.contains(says)
    })
}

/// metadata.name is checked by a CEL rule on the schema's root. The server puts the
/// cause on `metadata.name` only if the schema declares that property (a rule's
/// `fieldPath` must point into the schema); otherwise the cause is on `<nil>` and the
/// rule's message must name the field. Either way the user learns which field is wrong.
fn expect_name_rejected<T: std::fmt::Debug>(
    result: kube::Result<T>,
    says: &str,
) -> anyhow::Result<()> {
    let status = rejection(result, "metadata.name")?;
    expect_cause(
        &status,
        &format!("naming metadata.name and saying {says:?}"),
        |f, m| m.contains(says) && f == "metadata.name",
    )
}

async fn expect_create_rejected(
    env: &Env,
    object: Value,
    field: &str,
    says: &str,
) -> anyhow::Result<()> {
    let result = env.create(object).await;
    expect_invalid(result, field, says)
}

#[tokio::test]
async fn a_minimal_benchcluster_is_accepted_and_gets_the_schema_defaults() -> anyhow::Result<()> {
    with_env("crd-defaults", |env| async move {
        env.create(minimal("small")).await?;
        let bc = env.typed().get("small").await?;
        let spec = &bc.spec;
        ensure!(
            spec.kubernetes.pod_subnet == "10.244.0.0/16",
            "podSubnet {:?}",
            spec.kubernetes.pod_subnet
        );
        ensure!(
            spec.kubernetes.service_subnet == "10.96.0.0/12",
            "serviceSubnet {:?}",
            spec.kubernetes.service_subnet
        );
        ensure!(spec.ssh.user == "bench", "ssh.user {:?}", spec.ssh.user);
        ensure!(spec.control_plane.image.firmware == Firmware::Bios);
        ensure!(spec.workers.template.image.firmware == Firmware::Bios);
        ensure!(!spec.paused);
        ensure!(spec.workers.replicas == 1);

        // The defaults are in the stored object, not only in our deserialisation.
        let raw = env.dynamic().get("small").await?;
        let stored = &raw.data["spec"];
        ensure!(
            stored["kubernetes"]["podSubnet"] == "10.244.0.0/16"
                && stored["ssh"]["user"] == "bench"
                && stored["controlPlane"]["image"]["firmware"] == "bios"
                && stored["paused"] == false,
            "defaults missing from the stored spec: {stored:#}"
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_fully_specified_benchcluster_round_trips() -> anyhow::Result<()> {
    with_env("crd-full", |env| async move {
        let full = json!({
            "apiVersion": "benchcluster.dev/v1alpha1",
            "kind": "BenchCluster",
            "metadata": {"name": "medium"},
            "spec": {
                "controlPlane": {
                    "cpus": 8, "memory": "32Gi", "disk": "80G",
                    "image": {"volume": "nixos-master_v2+b1.qcow2", "firmware": "uefi"},
                },
                "workers": {
                    "replicas": 4, "cpus": 16, "memory": "64Gi", "disk": "200G",
                    "image": {"volume": "nixos-worker.qcow2", "firmware": "uefi"},
                },
                "network": {"name": "scheduler_benchmark_net"},
                "kubernetes": {"podSubnet": "10.32.0.0/12", "serviceSubnet": "172.20.0.0/16"},
                "ssh": {"user": "nixos", "keySecret": {"name": "bench.ssh-key"}},
                "paused": true,
            },
        });
        env.create(full).await?;
        let spec = env.typed().get("medium").await?.spec;
        ensure!(spec.workers.replicas == 4 && spec.workers.template.cpus == 16);
        ensure!(spec.control_plane.image.firmware == Firmware::Uefi);
        ensure!(spec.kubernetes.service_subnet == "172.20.0.0/16");
        ensure!(spec.ssh.user == "nixos" && spec.ssh.key_secret.name == "bench.ssh-key");
        ensure!(spec.paused);
        Ok(())
    })
    .await
}

#[tokio::test]
async fn negative_replicas_are_rejected() -> anyhow::Result<()> {
    with_env("crd-neg-replicas", |env| async move {
        let bad = with(minimal("x"), "/spec/workers/replicas", json!(-1));
        expect_create_rejected(
            &env,
            bad,
            "spec.workers.replicas",
            "greater than or equal to 0",
        )
        .await
    })
    .await
}

#[tokio::test]
async fn a_thousand_replicas_are_rejected() -> anyhow::Result<()> {
    with_env("crd-many-replicas", |env| async move {
        let bad = with(minimal("x"), "/spec/workers/replicas", json!(1000));
        expect_create_rejected(
            &env,
            bad,
            "spec.workers.replicas",
            "less than or equal to 256",
        )
        .await
    })
    .await
}

#[tokio::test]
async fn zero_memory_is_rejected() -> anyhow::Result<()> {
    with_env("crd-zero-memory", |env| async move {
        let bad = with(minimal("x"), "/spec/controlPlane/memory", json!("0"));
        expect_create_rejected(
            &env,
            bad,
            "spec.controlPlane.memory",
            "between 256Mi and 4Ti",
        )
        .await
    })
    .await
}

#[tokio::test]
async fn too_little_memory_is_rejected() -> anyhow::Result<()> {
    with_env("crd-small-memory", |env| async move {
        let bad = with(minimal("x"), "/spec/workers/memory", json!("1Mi"));
        expect_create_rejected(&env, bad, "spec.workers.memory", "between 256Mi and 4Ti").await
    })
    .await
}

#[tokio::test]
async fn memory_that_is_not_a_quantity_is_rejected() -> anyhow::Result<()> {
    with_env("crd-lots-memory", |env| async move {
        let bad = with(minimal("x"), "/spec/controlPlane/memory", json!("lots"));
        expect_create_rejected(&env, bad, "spec.controlPlane.memory", "must be a quantity").await
    })
    .await
}

#[tokio::test]
async fn a_disk_smaller_than_a_gibibyte_is_rejected() -> anyhow::Result<()> {
    with_env("crd-small-disk", |env| async move {
        let bad = with(minimal("x"), "/spec/workers/disk", json!("512Mi"));
        expect_create_rejected(&env, bad, "spec.workers.disk", "between 1Gi and 64Ti").await
    })
    .await
}

#[tokio::test]
async fn zero_cpus_are_rejected() -> anyhow::Result<()> {
    with_env("crd-zero-cpus", |env| async move {
        let bad = with(minimal("x"), "/spec/controlPlane/cpus", json!(0));
        expect_create_rejected(
            &env,
            bad,
            "spec.controlPlane.cpus",
            "greater than or equal to 1",
        )
        .await
    })
    .await
}

#[tokio::test]
async fn a_name_that_is_not_a_dns_label_is_rejected() -> anyhow::Result<()> {
    with_env("crd-bad-name", |env| async move {
        // Upper case and '_': not even a DNS subdomain.
        expect_name_rejected(env.create(minimal("Bad_Name")).await, "")?;
        // A DNS subdomain, which the API server itself accepts for any resource.
        expect_name_rejected(env.create(minimal("bench.cluster")).await, "DNS label")
    })
    .await
}

#[tokio::test]
async fn a_name_longer_than_40_characters_is_rejected() -> anyhow::Result<()> {
    with_env("crd-long-name", |env| async move {
        let long = "a".repeat(41);
        expect_name_rejected(env.create(minimal(&long)).await, "40")?;
        // The boundary itself is allowed.
        env.create(minimal(&"a".repeat(40))).await?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_image_volume_that_is_a_path_is_rejected() -> anyhow::Result<()> {
    with_env("crd-volume-path", |env| async move {
        let dotdot = with(
            minimal("x"),
            "/spec/controlPlane/image/volume",
            json!("../etc/passwd"),
        );
        expect_create_rejected(&env, dotdot, "spec.controlPlane.image.volume", "not a path")
            .await?;
        let absolute = with(
            minimal("x"),
            "/spec/workers/image/volume",
            json!("/var/lib/x.qcow2"),
        );
        expect_create_rejected(&env, absolute, "spec.workers.image.volume", "not a path").await
    })
    .await
}

#[tokio::test]
async fn a_pod_subnet_that_is_not_a_cidr_is_rejected() -> anyhow::Result<()> {
    with_env("crd-bad-cidr", |env| async move {
        let bad = with(
            minimal("x"),
            "/spec/kubernetes",
            json!({"podSubnet": "10.244.0.0"}),
        );
        expect_create_rejected(&env, bad, "spec.kubernetes.podSubnet", "must be a CIDR").await
    })
    .await
}

#[tokio::test]
async fn an_ssh_user_with_shell_syntax_is_rejected() -> anyhow::Result<()> {
    with_env("crd-ssh-user", |env| async move {
        for user in ["bench;reboot", "$(id)"] {
            let bad = with(minimal("x"), "/spec/ssh/user", json!(user));
            expect_create_rejected(&env, bad, "spec.ssh.user", "POSIX user name")
                .await
                .with_context(|| format!("ssh.user {user:?}"))?;
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn an_ssh_user_of_root_is_rejected() -> anyhow::Result<()> {
    with_env("crd-ssh-root", |env| async move {
        // A POSIX name, but the images' sshd refuses root (PermitRootLogin no), so the
        // controller would wait on SSH forever.
        let bad = with(minimal("x"), "/spec/ssh/user", json!("root"));
        expect_create_rejected(&env, bad, "spec.ssh.user", "must not be root").await?;
        // Names that merely contain it are ordinary users.
        for (name, user) in [("rooted", "rooter"), ("underscore", "_root")] {
            let ok = with(minimal(name), "/spec/ssh/user", json!(user));
            env.create(ok)
                .await
                .with_context(|| format!("ssh.user {user:?}"))?;
        }
        Ok(())
    })
    .await
}

/// `minimal(name)` with `spec.kubernetes` set to these subnets.
fn with_subnets(name: &str, pod: &str, service: &str) -> Value {
    with(
        minimal(name),
        "/spec/kubernetes",
        json!({"podSubnet": pod, "serviceSubnet": service}),
    )
}

#[tokio::test]
async fn a_pod_subnet_overlapping_the_service_subnet_is_rejected() -> anyhow::Result<()> {
    with_env("crd-overlap", |env| async move {
        const SAYS: &str = "must be disjoint";
        // The example: the pod subnet inside the default service subnet
        // (10.96.0.0/12 is 10.96.0.0 to 10.111.255.255). The message names both values,
        // the defaulted one too.
        let inside = with(
            minimal("x"),
            "/spec/kubernetes",
            json!({"podSubnet": "10.96.0.0/16"}),
        );
        expect_create_rejected(
            &env,
            inside,
            "spec.kubernetes.podSubnet",
            "podSubnet 10.96.0.0/16 overlaps serviceSubnet 10.96.0.0/12: they must be disjoint",
        )
        .await
        .context("pod subnet inside the default service subnet")?;
        for (pod, service) in [
            // The service subnet inside the pod subnet.
            ("10.0.0.0/8", "10.96.0.0/12"),
            // The same range twice.
            ("10.244.0.0/16", "10.244.0.0/16"),
            // Host bits set: the library masks them before comparing.
            ("10.100.7.1/16", "10.96.0.0/12"),
        ] {
            let bad = with_subnets("x", pod, service);
            expect_create_rejected(&env, bad, "spec.kubernetes.podSubnet", SAYS)
                .await
                .with_context(|| format!("podSubnet {pod} with serviceSubnet {service}"))?;
        }
        // Adjacent ranges do not overlap: 10.112.0.0/16 starts right after 10.96.0.0/12.
        env.create(with_subnets("adjacent", "10.112.0.0/16", "10.96.0.0/12"))
            .await
            .context("adjacent subnets must be accepted")?;
        env.create(with_subnets("below", "10.95.0.0/16", "10.96.0.0/12"))
            .await
            .context("the range just below the service subnet must be accepted")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn ipv6_subnets_are_rejected() -> anyhow::Result<()> {
    with_env("crd-ipv6", |env| async move {
        // The VMs have IPv4 leases only: kube-apiserver refuses a service range of
        // another family than its advertise address, and an IPv6 pod subnet makes
        // kubeadm's preflight require IPv6 forwarding, which the images do not set.
        let pod = with_subnets("x", "fd00:10:244::/56", "10.96.0.0/12");
        expect_create_rejected(&env, pod, "spec.kubernetes.podSubnet", "IPv4 CIDR").await?;
        let service = with_subnets("x", "10.244.0.0/16", "fd00:10:96::/112");
        expect_create_rejected(&env, service, "spec.kubernetes.serviceSubnet", "IPv4 CIDR").await
    })
    .await
}

#[tokio::test]
async fn a_pod_subnet_outside_kubeadms_node_mask_bounds_is_rejected() -> anyhow::Result<()> {
    with_env("crd-pod-mask", |env| async move {
        const SAYS: &str = "IPv4 CIDR from /8 to /24";
        // Smaller than one node's /24, or more than 16 bits larger than it.
        for pod in ["10.244.0.0/25", "10.244.0.0/28", "10.0.0.0/7"] {
            let bad = with_subnets("x", pod, "10.96.0.0/12");
            expect_create_rejected(&env, bad, "spec.kubernetes.podSubnet", SAYS)
                .await
                .with_context(|| format!("podSubnet {pod}"))?;
        }
        // The bounds themselves are allowed (a /24 holds the control plane only).
        env.create(with_subnets("slash8", "20.0.0.0/8", "10.96.0.0/12"))
            .await
            .context("a /8 pod subnet")?;
        let slash24 = with(
            with_subnets("slash24", "10.244.0.0/24", "10.96.0.0/12"),
            "/spec/workers/replicas",
            json!(0),
        );
        env.create(slash24).await.context("a /24 pod subnet")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_service_subnet_outside_kubeadms_size_bounds_is_rejected() -> anyhow::Result<()> {
    with_env("crd-service-mask", |env| async move {
        const SAYS: &str = "IPv4 CIDR from /12 to /28";
        // More than 20 host bits (kube-apiserver and kubeadm), or fewer than 10 addresses.
        for service in ["10.96.0.0/11", "10.96.0.0/29", "10.96.0.0/32"] {
            let bad = with_subnets("x", "10.244.0.0/16", service);
            expect_create_rejected(&env, bad, "spec.kubernetes.serviceSubnet", SAYS)
                .await
                .with_context(|| format!("serviceSubnet {service}"))?;
        }
        env.create(with_subnets("slash12", "10.244.0.0/16", "10.96.0.0/12"))
            .await
            .context("a /12 service subnet")?;
        env.create(with_subnets("slash28", "10.244.0.0/16", "10.96.0.0/28"))
            .await
            .context("a /28 service subnet")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn more_workers_than_the_pod_subnet_holds_are_rejected() -> anyhow::Result<()> {
    with_env("crd-pod-capacity", |env| async move {
        const SAYS: &str = "are more than kubernetes.podSubnet";
        // A /20 holds 16 node /24s: the control plane and 15 workers.
        let small = |name: &str, replicas: i32| {
            with(
                with_subnets(name, "10.244.0.0/20", "10.96.0.0/12"),
                "/spec/workers/replicas",
                json!(replicas),
            )
        };
        expect_create_rejected(
            &env,
            small("x", 16),
            "spec.workers.replicas",
            "the workers of all pools are more than kubernetes.podSubnet 10.244.0.0/20 holds: \
             each node, the control plane included, takes a /24 of it, so it holds the \
             control plane and 15 workers",
        )
        .await?;
        env.create(small("fits", 15))
            .await
            .context("1 + 15 nodes in a /20")?;
        // Scaling past it is refused too, by edit and by the scale subresource.
        let result = update(&env, "fits", "/spec/workers/replicas", json!(16)).await;
        expect_invalid(result, "spec.workers.replicas", SAYS)?;
        let error = env
            .kubectl(&["scale", "bc/fits", "--replicas=16"])
            .await
            .err()
            .ok_or_else(|| anyhow!("kubectl scale to 16 workers in a /20 was accepted"))?;
        ensure!(
            error.to_string().contains(SAYS),
            "unexpected error: {error:#}"
        );

        // The default /16 holds 256 nodes: 255 workers, not the 256 replicas allow.
        let many = |name: &str, replicas: i32| {
            with(minimal(name), "/spec/workers/replicas", json!(replicas))
        };
        expect_create_rejected(
            &env,
            many("x", 256),
            "spec.workers.replicas",
            "holds the control plane and 255 workers",
        )
        .await?;
        env.create(many("full", 255))
            .await
            .context("1 + 255 nodes in the default /16")?;
        // A /15 holds 512.
        let larger = with(
            with_subnets("larger", "10.244.0.0/15", "10.96.0.0/12"),
            "/spec/workers/replicas",
            json!(256),
        );
        env.create(larger).await.context("1 + 256 nodes in a /15")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn more_than_255_cpus_are_rejected() -> anyhow::Result<()> {
    with_env("crd-many-cpus", |env| async move {
        // QEMU refuses 256 vCPUs on both machine types without an IOMMU.
        for field in ["controlPlane", "workers"] {
            let bad = with(minimal("x"), &format!("/spec/{field}/cpus"), json!(256));
            expect_create_rejected(
                &env,
                bad,
                &format!("spec.{field}.cpus"),
                "less than or equal to 255",
            )
            .await?;
        }
        let most = with(minimal("most"), "/spec/controlPlane/cpus", json!(255));
        env.create(with(most, "/spec/workers/cpus", json!(255)))
            .await
            .context("255 vCPUs")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_control_plane_kubeadm_preflight_would_refuse_is_rejected() -> anyhow::Result<()> {
    with_env("crd-small-control-plane", |env| async move {
        // kubeadm init's preflight: at least 2 CPUs and 1700 MB seen by the guest.
        let one_cpu = with(minimal("x"), "/spec/controlPlane/cpus", json!(1));
        expect_create_rejected(&env, one_cpu, "spec.controlPlane.cpus", "at least 2").await?;
        let small = with(minimal("x"), "/spec/controlPlane/memory", json!("1536Mi"));
        expect_create_rejected(&env, small, "spec.controlPlane.memory", "at least 2Gi").await?;
        // Workers have no such preflight check: one CPU and 1Gi are fine there.
        let worker = with(minimal("w"), "/spec/workers/cpus", json!(1));
        let worker = with(worker, "/spec/workers/memory", json!("1Gi"));
        let smallest = with(worker, "/spec/controlPlane/memory", json!("2Gi"));
        env.create(with(smallest, "/spec/controlPlane/cpus", json!(2)))
            .await
            .context("2 cpus and 2Gi on the control plane, 1 and 1Gi on workers")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn quantities_in_any_form_the_schema_accepts_are_read_as_the_server_reads_them()
-> anyhow::Result<()> {
    with_env("crd-quantity-forms", |env| async move {
        // The schema checks memory and disk with CEL's quantity(); the controller turns
        // what it let through into bytes with parse_bytes, which must not refuse any.
        let cases = [
            ("+4Gi", "+40Gi", 4u64 << 30, 40u64 << 30),
            ("2147483648000m", "21474836480e+1", 2 << 30, 200 << 30),
            ("4.5Gi", "42949672960000e-3", 9 << 29, 40 << 30),
        ];
        for (i, (memory, disk, memory_bytes, disk_bytes)) in cases.into_iter().enumerate() {
            let name = format!("form-{i}");
            let object = with(minimal(&name), "/spec/controlPlane/memory", json!(memory));
            let object = with(object, "/spec/controlPlane/disk", json!(disk));
            env.create(object)
                .await
                .with_context(|| format!("memory {memory:?}, disk {disk:?}"))?;
            let stored = env.typed().get(&name).await?.spec.control_plane;
            ensure!(
                parse_bytes(&stored.memory)? == memory_bytes
                    && parse_bytes(&stored.disk)? == disk_bytes,
                "the server accepted memory {:?} and disk {:?}, read as {:?} and {:?}",
                stored.memory,
                stored.disk,
                parse_bytes(&stored.memory),
                parse_bytes(&stored.disk)
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_network_name_with_a_space_is_rejected() -> anyhow::Result<()> {
    with_env("crd-network-name", |env| async move {
        let bad = with(minimal("x"), "/spec/network/name", json!("my net"));
        expect_create_rejected(&env, bad, "spec.network.name", "libvirt network name").await
    })
    .await
}

/// Replaces the stored object's spec at `pointer` with `value` (an update, so the
/// transition rules run) and returns the server's answer.
async fn update(env: &Env, name: &str, pointer: &str, value: Value) -> kube::Result<DynamicObject> {
    let mut current = env.dynamic().get(name).await?;
    current.data = with(current.data, pointer, value);
    env.dynamic()
        .replace(name, &PostParams::default(), &current)
        .await
}

#[tokio::test]
async fn the_control_plane_is_immutable() -> anyhow::Result<()> {
    with_env("crd-immutable-cp", |env| async move {
        env.create(minimal("fixed")).await?;
        let result = update(&env, "fixed", "/spec/controlPlane/cpus", json!(4)).await;
        expect_invalid(result, "spec.controlPlane", "controlPlane is immutable")
    })
    .await
}

#[tokio::test]
async fn the_network_is_immutable() -> anyhow::Result<()> {
    with_env("crd-immutable-net", |env| async move {
        env.create(minimal("fixed")).await?;
        let result = update(&env, "fixed", "/spec/network/name", json!("other_net")).await;
        expect_invalid(result, "spec.network", "network is immutable")
    })
    .await
}

#[tokio::test]
async fn the_worker_template_is_immutable_but_replicas_are_not() -> anyhow::Result<()> {
    with_env("crd-immutable-workers", |env| async move {
        env.create(minimal("fixed")).await?;
        let result = update(&env, "fixed", "/spec/workers/cpus", json!(8)).await;
        expect_invalid(
            result,
            "spec.workers.cpus",
            "cpus of a worker pool is immutable",
        )?;

        update(&env, "fixed", "/spec/workers/replicas", json!(5))
            .await
            .context("changing replicas must be allowed")?;
        let bc = env.typed().get("fixed").await?;
        ensure!(
            bc.spec.workers.replicas == 5,
            "replicas {}",
            bc.spec.workers.replicas
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kubectl_explain_documents_the_workers() -> anyhow::Result<()> {
    with_env("crd-explain", |env| async move {
        // The OpenAPI document is published shortly after the CRD is Established.
        let text = wait::until(
            "kubectl explain to know benchcluster.spec.workers",
            Duration::from_secs(60),
            Duration::from_millis(250),
            || async {
                env.kubectl(&["explain", "benchcluster.spec.workers"])
                    .await
                    .map(Some)
            },
        )
        .await?;
        for expected in [
            "replicas",
            "Number of worker VMs",
            "cpus",
            "memory",
            "disk",
            "image",
        ] {
            ensure!(
                text.contains(expected),
                "kubectl explain does not mention {expected:?}:\n{text}"
            );
        }
        Ok(())
    })
    .await
}

#[tokio::test]
async fn kubectl_scale_changes_the_worker_replicas() -> anyhow::Result<()> {
    with_env("crd-scale", |env| async move {
        env.create(minimal("scaled")).await?;
        let out = env.kubectl(&["scale", "bc/scaled", "--replicas=3"]).await?;
        ensure!(out.contains("scaled"), "kubectl scale said: {out}");
        let bc = env.typed().get("scaled").await?;
        ensure!(
            bc.spec.workers.replicas == 3,
            "spec.workers.replicas is {} after kubectl scale",
            bc.spec.workers.replicas
        );
        // The scale subresource applies the same bounds as the spec.
        let too_many = env
            .kubectl(&["scale", "bc/scaled", "--replicas=1000"])
            .await;
        let error = too_many
            .err()
            .ok_or_else(|| anyhow!("kubectl scale to 1000 replicas was accepted"))?;
        ensure!(
            error.to_string().contains("spec.workers.replicas"),
            "unexpected error: {error:#}"
        );
        Ok(())
    })
    .await
}

/// A pool for `spec.pools`, shaped like the minimal worker.
fn pool(name: &str) -> Value {
    json!({
        "name": name,
        "replicas": 1,
        "cpus": 4,
        "memory": "4Gi",
        "disk": "20Gi",
        "image": {"volume": "worker.qcow2"},
    })
}

fn with_pools(pools: Value) -> Value {
    with(minimal("x"), "/spec/pools", pools)
}

#[tokio::test]
async fn pools_with_labels_taints_and_resources_round_trip() -> anyhow::Result<()> {
    with_env("crd-pools", |env| async move {
        let mut gpu = pool("gpu");
        gpu["nodeLabels"] =
            json!({"example.com/accelerator": "fake", "node-role.kubernetes.io/gpu": ""});
        gpu["taints"] = json!([{"key": "example.com/accelerator", "effect": "NoSchedule"}]);
        gpu["extendedResources"] = json!({"example.com/fake-gpu": 2});
        gpu["kubelet"] =
            json!({"maxPods": 30, "systemReserved": {"cpu": "250m", "memory": "256Mi"}});
        env.create(with_pools(json!([pool("big"), gpu]))).await?;
        let bc = env.typed().get("x").await?;
        ensure!(bc.spec.pools.len() == 2, "pools {:?}", bc.spec.pools);
        let gpu = &bc.spec.pools[1];
        ensure!(gpu.name == "gpu");
        ensure!(
            gpu.pool
                .template
                .extended_resources
                .get("example.com/fake-gpu")
                == Some(&2)
        );
        ensure!(gpu.pool.template.taints[0].effect == TaintEffect::NoSchedule);
        ensure!(gpu.pool.template.kubelet.max_pods == Some(30));
        // Replicas of a pool change; a pool goes from the list.
        update(&env, "x", "/spec/pools/1/replicas", json!(3))
            .await
            .context("changing a pool's replicas must be allowed")?;
        let mut current = env.dynamic().get("x").await?;
        current.data["spec"]["pools"] = json!([current.data["spec"]["pools"][1]]);
        env.dynamic()
            .replace("x", &PostParams::default(), &current)
            .await
            .context("removing a pool must be allowed")?;
        let bc = env.typed().get("x").await?;
        ensure!(
            bc.spec.pools.len() == 1 && bc.spec.pools[0].pool.replicas == 3,
            "pools after the edits: {:?}",
            bc.spec.pools
        );
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_pools_are_rejected_naming_the_field() -> anyhow::Result<()> {
    with_env("crd-bad-pools", |env| async move {
        let labelled = |labels: Value| {
            let mut p = pool("p");
            p["nodeLabels"] = labels;
            json!([p])
        };
        let tainted = |taint: Value| {
            let mut p = pool("p");
            p["taints"] = json!([taint]);
            json!([p])
        };
        let resourced = |resources: Value| {
            let mut p = pool("p");
            p["extendedResources"] = resources;
            json!([p])
        };
        let many = |replicas: i64| {
            let mut p = pool("p");
            p["replicas"] = json!(replicas);
            json!([p])
        };
        let cases: Vec<(&str, Value, &str, &str)> = vec![
            (
                "a dash in a pool name",
                json!([pool("gpu-a")]),
                "spec.pools[0].name",
                "lowercase letters and digits",
            ),
            (
                "the default pool's name",
                json!([pool("w")]),
                "spec.pools[0].name",
                "must not be w",
            ),
            (
                "the control plane's name",
                json!([pool("cp")]),
                "spec.pools[0].name",
                "nor cp",
            ),
            (
                "a 19-character pool name",
                json!([pool(&"p".repeat(19))]),
                "spec.pools[0].name",
                "18",
            ),
            (
                "two pools of one name",
                json!([pool("a"), pool("a")]),
                "spec.pools[1]",
                "Duplicate value",
            ),
            (
                "a label key with a space",
                labelled(json!({"bad key": "x"})),
                "spec.pools[0].nodeLabels",
                "label keys",
            ),
            (
                "a label value with a slash",
                labelled(json!({"rack": "a/b"})),
                "spec.pools[0].nodeLabels",
                "label values",
            ),
            (
                "the pool label",
                labelled(json!({"benchcluster.dev/pool": "x"})),
                "spec.pools[0].nodeLabels",
                "benchcluster.dev/",
            ),
            (
                "the kubelet's hostname label",
                labelled(json!({"kubernetes.io/hostname": "x"})),
                "spec.pools[0].nodeLabels",
                "kubernetes.io/hostname",
            ),
            (
                "a taint effect Kubernetes lacks",
                tainted(json!({"key": "k", "effect": "Sometimes"})),
                "spec.pools[0].taints[0].effect",
                "Unsupported value",
            ),
            (
                "a taint key with a space",
                tainted(json!({"key": "a b", "effect": "NoSchedule"})),
                "spec.pools[0].taints[0].key",
                "label key",
            ),
            (
                "an unprefixed extended resource",
                resourced(json!({"fake-gpu": 1})),
                "spec.pools[0].extendedResources",
                "domain-prefixed",
            ),
            (
                "a kubernetes.io extended resource",
                resourced(json!({"kubernetes.io/gpu": 1})),
                "spec.pools[0].extendedResources",
                "kubernetes.io",
            ),
            (
                "no extended resource at all",
                resourced(json!({"example.com/gpu": 0})),
                "spec.pools[0].extendedResources",
                "from 1 to 1000000",
            ),
            (
                "more than 256 workers in all",
                many(256),
                "spec.pools",
                "more than 256 workers",
            ),
            (
                "more pods than a node's /24 holds",
                {
                    let mut p = pool("p");
                    p["kubelet"] = json!({"maxPods": 300});
                    json!([p])
                },
                "spec.pools[0].kubelet.maxPods",
                "less than or equal to 250",
            ),
            (
                "a reservation that is not a quantity",
                {
                    let mut p = pool("p");
                    p["kubelet"] = json!({"kubeReserved": {"memory": "lots"}});
                    json!([p])
                },
                "spec.pools[0].kubelet.kubeReserved.memory",
                "non-negative quantity",
            ),
            (
                "seventeen pools",
                json!((0..17).map(|i| pool(&format!("p{i}"))).collect::<Vec<_>>()),
                "spec.pools",
                "17",
            ),
        ];
        let mut failures = Vec::new();
        for (what, pools, field, says) in cases {
            if let Err(e) = expect_invalid(env.create(with_pools(pools)).await, field, says) {
                failures.push(format!("{what}: {e:#}"));
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
        Ok(())
    })
    .await
}

#[tokio::test]
async fn a_pools_shape_and_scheduling_properties_are_immutable() -> anyhow::Result<()> {
    with_env("crd-pool-immutable", |env| async move {
        env.create(with_pools(json!([pool("big")]))).await?;
        for (pointer, value, field, says) in [
            (
                "/spec/pools/0/cpus",
                json!(8),
                "spec.pools[0].cpus",
                "cpus of a worker pool is immutable",
            ),
            (
                "/spec/pools/0/nodeLabels",
                json!({"rack": "r2"}),
                "spec.pools[0].nodeLabels",
                "nodeLabels of a worker pool are immutable",
            ),
            (
                "/spec/pools/0/taints",
                json!([{"key": "k", "effect": "NoSchedule"}]),
                "spec.pools[0].taints",
                "taints of a worker pool are immutable",
            ),
            (
                "/spec/workers/extendedResources",
                json!({"example.com/gpu": 1}),
                "spec.workers.extendedResources",
                "extendedResources of a worker pool are immutable",
            ),
        ] {
            let result = update(&env, "x", pointer, value).await;
            expect_invalid(result, field, says).with_context(|| format!("changing {pointer}"))?;
        }
        Ok(())
    })
    .await
}

fn with_scheduler_config(config: Value) -> Value {
    with(minimal("x"), "/spec/scheduler", json!({"config": config}))
}

#[tokio::test]
async fn a_scheduler_config_is_stored_with_every_field_as_written() -> anyhow::Result<()> {
    with_env("crd-scheduler", |env| async move {
        env.create(with_scheduler_config(testbed::most_allocated()))
            .await?;
        // Fields the schema does not declare (pluginConfig and below) are kept, not pruned.
        let raw = env.dynamic().get("x").await?;
        let stored = &raw.data["spec"]["scheduler"]["config"];
        ensure!(
            *stored == testbed::most_allocated(),
            "stored config differs from the one sent: {stored:#}"
        );
        let bc = env.typed().get("x").await?;
        let config = bc.spec.scheduler.config.context("config missing")?;
        ensure!(
            Value::Object(config.0) == testbed::most_allocated(),
            "typed config differs"
        );
        // A cluster without one gets kube-scheduler's defaults; the field may change
        // (a benchmark's next run) and go.
        env.create(minimal("plain")).await?;
        let plain = env.typed().get("plain").await?;
        ensure!(plain.spec.scheduler.config.is_none());
        let mut changed = testbed::most_allocated();
        changed["profiles"][0]["schedulerName"] = json!("packing");
        update(&env, "x", "/spec/scheduler/config", changed)
            .await
            .context("changing the scheduler config must be allowed")?;
        update(&env, "x", "/spec/scheduler", json!({}))
            .await
            .context("removing the scheduler config must be allowed")?;
        Ok(())
    })
    .await
}

#[tokio::test]
async fn bad_scheduler_configs_are_rejected_naming_the_field() -> anyhow::Result<()> {
    with_env("crd-bad-scheduler", |env| async move {
        let set = |pointer: &str, value: Value| with(testbed::most_allocated(), pointer, value);
        let without = |key: &str| {
            let mut config = testbed::most_allocated();
            config.as_object_mut().unwrap().remove(key);
            config
        };
        let profile = |name: &str| json!({"schedulerName": name});
        let cases: Vec<(&str, Value, &str, &str)> = vec![
            (
                "an older apiVersion",
                set("/apiVersion", json!("kubescheduler.config.k8s.io/v1beta3")),
                "spec.scheduler.config.apiVersion",
                "must be kubescheduler.config.k8s.io/v1",
            ),
            (
                "no apiVersion",
                without("apiVersion"),
                "spec.scheduler.config.apiVersion",
                "must be kubescheduler.config.k8s.io/v1",
            ),
            (
                "another kind",
                set("/kind", json!("KubeletConfiguration")),
                "spec.scheduler.config.kind",
                "must be KubeSchedulerConfiguration",
            ),
            (
                "no kind",
                without("kind"),
                "spec.scheduler.config.kind",
                "must be KubeSchedulerConfiguration",
            ),
            (
                "clientConnection",
                set(
                    "/clientConnection",
                    json!({"kubeconfig": "/etc/kubernetes/admin.conf"}),
                ),
                "spec.scheduler.config.clientConnection",
                "the controller manages it",
            ),
            (
                "leaderElection",
                set("/leaderElection", json!({"leaderElect": true})),
                "spec.scheduler.config.leaderElection",
                "the controller manages it",
            ),
            (
                "a config that is a string",
                json!("apiVersion: kubescheduler.config.k8s.io/v1"),
                "spec.scheduler.config",
                "must be of type object",
            ),
            (
                "a config that is a list",
                json!([testbed::most_allocated()]),
                "spec.scheduler.config",
                "must be of type object",
            ),
            (
                "profiles that are not a list",
                set("/profiles", profile("default-scheduler")),
                "spec.scheduler.config.profiles",
                "must be of type array",
            ),
            (
                "a profile without a schedulerName",
                set("/profiles", json!([{"plugins": {}}])),
                "spec.scheduler.config.profiles[0].schedulerName",
                "must have a schedulerName",
            ),
            (
                "a profile with an empty schedulerName",
                set("/profiles", json!([profile("")])),
                "spec.scheduler.config.profiles[0].schedulerName",
                "at least 1",
            ),
            (
                "two profiles of one schedulerName",
                set(
                    "/profiles",
                    json!([profile("a"), profile("b"), profile("a")]),
                ),
                "spec.scheduler.config.profiles",
                "must not repeat a schedulerName",
            ),
            (
                "seventeen profiles",
                set(
                    "/profiles",
                    json!(
                        (0..17)
                            .map(|i| profile(&format!("p{i}")))
                            .collect::<Vec<_>>()
                    ),
                ),
                "spec.scheduler.config.profiles",
                "17",
            ),
        ];
        let mut failures = Vec::new();
        for (what, config, field, says) in cases {
            let result = env.create(with_scheduler_config(config)).await;
            if let Err(e) = expect_invalid(result, field, says) {
                failures.push(format!("{what}: {e:#}"));
            }
        }
        for (what, image, says) in [
            (
                "an upper-case image",
                "Registry.example/Sched:v1",
                "must be an image reference",
            ),
            (
                "an image with a space",
                "localhost/sched custom",
                "must be an image reference",
            ),
            ("an empty image", "", "at least 1"),
        ] {
            let object = with(minimal("x"), "/spec/scheduler", json!({"image": image}));
            let result = env.create(object).await;
            if let Err(e) = expect_invalid(result, "spec.scheduler.image", says) {
                failures.push(format!("{what}: {e:#}"));
            }
        }
        let good = with(
            minimal("x"),
            "/spec/scheduler",
            json!({"image": "localhost/benchcluster/kube-scheduler:e2e"}),
        );
        if let Err(e) = env.create(good).await {
            failures.push(format!("a good image refused: {e:#}"));
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
        Ok(())
    })
    .await
}

/// Gates and flags for every component, none of them managed.
fn gates_and_flags() -> Value {
    json!({
        "featureGates": {"SchedulerQueueingHints": false, "InPlacePodVerticalScaling": true},
        "extraArgs": {
            "apiServer": {"v": "2", "audit-log-maxage": "7", "runtime-config": "api/all=true"},
            "controllerManager": {"v": "3", "concurrent-deployment-syncs": "10"},
            "scheduler": {"v": "4", "bind-address": "0.0.0.0"},
            "kubelet": {"v": "5", "eviction-hard": "memory.available<100Mi", "read-only-port": ""},
        },
    })
}

fn with_kubernetes(kubernetes: Value) -> Value {
    with(minimal("x"), "/spec/kubernetes", kubernetes)
}

#[tokio::test]
async fn feature_gates_and_component_flags_are_stored_as_written() -> anyhow::Result<()> {
    with_env("crd-components", |env| async move {
        env.create(with_kubernetes(gates_and_flags())).await?;
        let raw = env.dynamic().get("x").await?;
        let stored = &raw.data["spec"]["kubernetes"];
        for field in ["featureGates", "extraArgs"] {
            ensure!(
                stored[field] == gates_and_flags()[field],
                "stored {field} differs from the one sent: {stored:#}"
            );
        }
        ensure!(stored["podSubnet"] == "10.244.0.0/16", "{stored:#}");
        let kubernetes = env.typed().get("x").await?.spec.kubernetes;
        ensure!(kubernetes.feature_gates.get("SchedulerQueueingHints") == Some(&false));
        ensure!(kubernetes.extra_args.kubelet["eviction-hard"] == "memory.available<100Mi");

        // Without them, nothing is added to the stored object.
        env.create(minimal("plain")).await?;
        let plain = env.dynamic().get("plain").await?;
        let stored = &plain.data["spec"]["kubernetes"];
        ensure!(
            stored.get("featureGates").is_none() && stored.get("extraArgs").is_none(),
            "defaults added: {stored:#}"
        );

        // They apply when the cluster forms: changing them is changing the cluster.
        let result = update(
            &env,
            "x",
            "/spec/kubernetes/featureGates",
            json!({"SchedulerQueueingHints": true}),
        )
        .await;
        expect_invalid(result, "spec.kubernetes", "kubernetes is immutable")?;
        let result = update(
            &env,
            "plain",
            "/spec/kubernetes/extraArgs",
            json!({"kubelet": {"v": "2"}}),
        )
        .await;
        expect_invalid(result, "spec.kubernetes", "kubernetes is immutable")
    })
    .await
}

#[tokio::test]
async fn bad_gates_and_component_flags_are_rejected_naming_the_field() -> anyhow::Result<()> {
    with_env("crd-bad-components", |env| async move {
        let args = |component: &str, flags: Value| json!({"extraArgs": {component: flags}});
        let many = |n: usize| {
            Value::Object(
                (0..n)
                    .map(|i| (format!("flag-{i}"), json!("1")))
                    .collect(),
            )
        };
        let cases: Vec<(&str, Value, &str, &str)> = vec![
            (
                "scheduler leader-elect",
                args("scheduler", json!({"leader-elect": "true"})),
                "spec.kubernetes.extraArgs.scheduler",
                "spec.kubernetes.extraArgs.scheduler must not set leader-elect: the controller manages it",
            ),
            (
                "scheduler config",
                args("scheduler", json!({"v": "2", "config": "/etc/x.yaml"})),
                "spec.kubernetes.extraArgs.scheduler",
                "must not set config: the controller manages it; set spec.scheduler.config",
            ),
            (
                "controller-manager leader-elect",
                args("controllerManager", json!({"leader-elect": "true"})),
                "spec.kubernetes.extraArgs.controllerManager",
                "spec.kubernetes.extraArgs.controllerManager must not set leader-elect",
            ),
            (
                "controller-manager cluster-cidr",
                args("controllerManager", json!({"cluster-cidr": "10.0.0.0/8"})),
                "spec.kubernetes.extraArgs.controllerManager",
                "must not set cluster-cidr: kubeadm sets it from spec.kubernetes.podSubnet",
            ),
            (
                "api server secure-port",
                args("apiServer", json!({"secure-port": "443"})),
                "spec.kubernetes.extraArgs.apiServer",
                "spec.kubernetes.extraArgs.apiServer must not set secure-port",
            ),
            (
                "api server advertise-address",
                args("apiServer", json!({"advertise-address": "10.0.0.1"})),
                "spec.kubernetes.extraArgs.apiServer",
                "must not set advertise-address",
            ),
            (
                "feature-gates as a flag",
                args("apiServer", json!({"feature-gates": "A=true"})),
                "spec.kubernetes.extraArgs.apiServer",
                "must not set feature-gates: use spec.kubernetes.featureGates",
            ),
            (
                "kubelet max-pods",
                args("kubelet", json!({"max-pods": "500"})),
                "spec.kubernetes.extraArgs.kubelet",
                "spec.kubernetes.extraArgs.kubelet must not set max-pods: set it per pool with kubelet.maxPods",
            ),
            (
                "kubelet node-ip",
                args("kubelet", json!({"node-ip": "10.0.0.9"})),
                "spec.kubernetes.extraArgs.kubelet",
                "must not set node-ip",
            ),
            (
                "kubelet cgroup-driver",
                args("kubelet", json!({"cgroup-driver": "cgroupfs"})),
                "spec.kubernetes.extraArgs.kubelet",
                "must not set cgroup-driver",
            ),
            (
                "a value smuggling another flag",
                args("kubelet", json!({"v": "2 --node-ip=10.0.0.9"})),
                "spec.kubernetes.extraArgs.kubelet",
                "spec.kubernetes.extraArgs.kubelet values must be printable ASCII without spaces",
            ),
            (
                "a value with a quote",
                args("scheduler", json!({"v": "2\""})),
                "spec.kubernetes.extraArgs.scheduler",
                "values must be printable ASCII",
            ),
            (
                "a flag name with its dashes",
                args("scheduler", json!({"--v": "2"})),
                "spec.kubernetes.extraArgs.scheduler",
                "spec.kubernetes.extraArgs.scheduler keys must be flag names without the leading '--'",
            ),
            (
                "a flag name with a value",
                args("apiServer", json!({"v=2": ""})),
                "spec.kubernetes.extraArgs.apiServer",
                "keys must be flag names",
            ),
            (
                "33 flags",
                args("controllerManager", many(33)),
                "spec.kubernetes.extraArgs.controllerManager",
                "32",
            ),
            (
                "a lower-case feature gate",
                json!({"featureGates": {"schedulerQueueingHints": true}}),
                "spec.kubernetes.featureGates",
                "spec.kubernetes.featureGates keys must be feature gate names",
            ),
            (
                "a feature gate of a component's flag syntax",
                json!({"featureGates": {"A=true,B": true}}),
                "spec.kubernetes.featureGates",
                "keys must be feature gate names",
            ),
            (
                "65 feature gates",
                json!({"featureGates": Value::Object((0..65).map(|i| (format!("Gate{i}"), json!(true))).collect())}),
                "spec.kubernetes.featureGates",
                "64",
            ),
        ];
        let mut failures = Vec::new();
        for (what, kubernetes, field, says) in cases {
            let result = env.create(with_kubernetes(kubernetes)).await;
            if let Err(e) = expect_invalid(result, field, says) {
                failures.push(format!("{what}: {e:#}"));
            }
        }
        ensure!(failures.is_empty(), "{}", failures.join("\n\n"));
        Ok(())
    })
    .await
}
