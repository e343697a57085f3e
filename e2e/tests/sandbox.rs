//! vm tier smoke test: the sandbox and the guest image, without the controller.
//!
//! Two guests boot under qemu's software emulation from qcow2 overlays of the one
//! Debian image, each with a CIDATA seed made by the controller's own seed builder,
//! attached as a read-only virtio disk (docs/image-contract.md; the image's cloud
//! kernel has no SATA cdrom driver). Each must get a DHCP
//! lease for its own MAC that names its hostname, answer SSH with the host key from its
//! seed (pinned, strict checking), report its own hostname and a machine-id of its
//! own, and refuse a connection that pins another host key.
//!
//! Runs only with BENCHCLUSTER_VM_TESTS=1 (root, libvirtd, qemu: `cargo xtask test vm`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use benchcluster_controller::seed::{self, HostKey, Identity};
use benchcluster_e2e::sandbox::{
    IMAGE_POOL, NETWORK, NODE_POOL, Sandbox, SandboxOptions, vm_tests_enabled,
};
use benchcluster_e2e::wait;
use secrecy::ExposeSecret;

const USER: &str = "bench";
/// Generous: two guests share two host cores under emulation.
const LEASE_DEADLINE: Duration = Duration::from_secs(300);
const SSH_DEADLINE: Duration = Duration::from_secs(180);
const POLL: Duration = Duration::from_millis(250);
const SSH_CONNECT_TIMEOUT_SECONDS: u32 = 10;

struct Guest {
    name: &'static str,
    mac: &'static str,
    host_key: HostKey,
    console_log: PathBuf,
}

/// Timings of one guest, from `virsh start`.
#[derive(Debug, Default)]
struct Timings {
    lease: Duration,
    port_open: Duration,
    first_command: Duration,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_boot_get_leases_and_answer_ssh_with_pinned_host_keys() {
    if !vm_tests_enabled("guests_boot_get_leases_and_answer_ssh_with_pinned_host_keys") {
        return;
    }
    let started = Instant::now();
    let sandbox = Sandbox::start(SandboxOptions::default())
        .await
        .unwrap_or_else(|error| panic!("{error:#}"));
    eprintln!(
        "sandbox {} up in {:.1?} (uri {})",
        sandbox.netns(),
        started.elapsed(),
        sandbox.uri()
    );

    let guests = vec![
        Guest {
            name: "smoke-a",
            mac: "52:54:00:bc:00:0a",
            host_key: HostKey::generate().unwrap(),
            console_log: sandbox.dir().join("smoke-a.console.log"),
        },
        Guest {
            name: "smoke-b",
            mac: "52:54:00:bc:00:0b",
            host_key: HostKey::generate().unwrap(),
            console_log: sandbox.dir().join("smoke-b.console.log"),
        },
    ];
    let result = scenario(&sandbox, &guests).await;
    if let Err(error) = result {
        eprintln!("{}", sandbox.diagnostics());
        for guest in &guests {
            eprintln!(
                "--- console of {} ({})\n{}",
                guest.name,
                guest.console_log.display(),
                tail(&guest.console_log, 60)
            );
        }
        panic!("{error:#}");
    }
    // Everything started inside (libvirtd, dnsmasq, qemu) must be gone afterwards,
    // with the namespace and the directory.
    let netns = sandbox.netns().to_owned();
    let dir = sandbox.dir().to_owned();
    let inside = std::process::Command::new("ip")
        .args(["netns", "pids", &netns])
        .output()
        .unwrap();
    let pids: Vec<String> = String::from_utf8_lossy(&inside.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    assert!(!pids.is_empty(), "no process found in {netns}");
    let teardown = Instant::now();
    drop(sandbox);
    eprintln!("sandbox torn down in {:.1?}", teardown.elapsed());
    let survivors: Vec<&String> = pids.iter().filter(|pid| alive(pid)).collect();
    assert!(
        survivors.is_empty(),
        "still running after teardown: {survivors:?}"
    );
    assert!(
        !Path::new("/run/netns").join(&netns).exists(),
        "{netns} survived"
    );
    assert!(!dir.exists(), "{} survived", dir.display());
}

/// Whether a process exists and is not a zombie (a daemon reparented to an init that
/// does not reap stays a zombie, but is gone all the same).
fn alive(pid: &str) -> bool {
    std::fs::read_to_string(Path::new("/proc").join(pid).join("stat"))
        .ok()
        .and_then(|stat| {
            let state = stat
                .rsplit_once(')')?
                .1
                .split_whitespace()
                .next()?
                .to_owned();
            Some(state != "Z" && state != "X")
        })
        .unwrap_or(false)
}

async fn scenario(sandbox: &Sandbox, guests: &[Guest]) -> anyhow::Result<()> {
    let client_key = HostKey::generate()?;
    let client_key_file = sandbox.dir().join("id_ed25519");
    std::fs::write(&client_key_file, client_key.private_openssh.expose_secret())?;
    std::fs::set_permissions(&client_key_file, std::fs::Permissions::from_mode(0o600))?;

    let image_path = sandbox
        .virsh(&["vol-path", "--pool", IMAGE_POOL, sandbox.image_volume()])
        .await?
        .trim()
        .to_owned();

    for guest in guests {
        let define = Instant::now();
        let overlay = format!("{}.qcow2", guest.name);
        sandbox
            .virsh(&[
                "vol-create-as",
                NODE_POOL,
                &overlay,
                "4G",
                "--format",
                "qcow2",
                "--backing-vol",
                &image_path,
                "--backing-vol-format",
                "qcow2",
            ])
            .await?;
        let seed_volume = format!("{}-seed.img", guest.name);
        let seed = seed::build(&Identity {
            hostname: guest.name,
            instance_id: guest.name,
            user: USER,
            authorized_key: &client_key.public_openssh,
            host_key: &guest.host_key,
        })?;
        let seed_file = sandbox.dir().join(&seed_volume);
        std::fs::write(&seed_file, &seed)?;
        sandbox
            .virsh(&[
                "vol-create-as",
                NODE_POOL,
                &seed_volume,
                &seed.len().to_string(),
                "--format",
                "raw",
            ])
            .await?;
        sandbox
            .virsh(&[
                "vol-upload",
                "--pool",
                NODE_POOL,
                &seed_volume,
                &path_str(&seed_file),
            ])
            .await?;
        let xml = domain_xml(guest, &overlay, &seed_volume);
        let xml_file = sandbox.dir().join(format!("{}.xml", guest.name));
        std::fs::write(&xml_file, xml)?;
        sandbox.virsh(&["define", &path_str(&xml_file)]).await?;
        eprintln!(
            "{}: overlay, seed and domain defined in {:.1?}",
            guest.name,
            define.elapsed()
        );
    }

    // Boot all guests, then follow each: they share the host's cores as a cluster's
    // nodes would.
    let mut boots = Vec::new();
    for guest in guests {
        sandbox.virsh(&["start", guest.name]).await?;
        boots.push(Instant::now());
    }
    let mut machine_ids = Vec::new();
    for (guest, boot) in guests.iter().zip(boots) {
        let (timings, machine_id) = follow(sandbox, guest, boot, &client_key_file).await?;
        eprintln!(
            "{}: start -> lease {:.1?}, lease -> sshd listening {:.1?}, \
             sshd listening -> first command {:.1?}; start -> SSH {:.1?}",
            guest.name,
            timings.lease,
            timings.port_open - timings.lease,
            timings.first_command - timings.port_open,
            timings.first_command,
        );
        machine_ids.push(machine_id);
    }
    ensure!(
        machine_ids[0] != machine_ids[1],
        "two guests of one image share the machine-id {}",
        machine_ids[0]
    );
    Ok(())
}

/// Waits for `guest`'s lease, its sshd, and its answer over SSH; checks who answered.
/// Returns the timings and the guest's machine-id.
async fn follow(
    sandbox: &Sandbox,
    guest: &Guest,
    boot: Instant,
    client_key: &Path,
) -> anyhow::Result<(Timings, String)> {
    let mut timings = Timings::default();
    let lease = wait::until(
        &format!("a DHCP lease for {} ({})", guest.name, guest.mac),
        LEASE_DEADLINE.saturating_sub(boot.elapsed()),
        POLL,
        || sandbox.lease_for(guest.mac),
    )
    .await?;
    timings.lease = boot.elapsed();
    ensure!(
        lease.hostname.as_deref() == Some(guest.name),
        "the lease of {} names {:?}: the guest did not send its hostname",
        guest.name,
        lease.hostname
    );
    let ip = lease.ip;
    ensure!(
        ip.octets()[..3] == [192, 168, 222] && ip.octets()[3] >= 100,
        "lease {ip} outside the DHCP range of {NETWORK}"
    );

    // From inside the namespace, through run_inside: the way an in-process controller
    // reaches guests.
    sandbox
        .run_inside(move || async move {
            wait::until("sshd to listen", SSH_DEADLINE, POLL, || async move {
                let connect = tokio::net::TcpStream::connect((ip, 22));
                match tokio::time::timeout(Duration::from_secs(2), connect).await {
                    Ok(Ok(_)) => Some(()),
                    _ => None,
                }
            })
            .await
        })
        .await?;
    timings.port_open = boot.elapsed();

    let known_hosts = sandbox.dir().join(format!("{}.known_hosts", guest.name));
    std::fs::write(
        &known_hosts,
        format!("{ip} {}\n", guest.host_key.public_openssh),
    )?;
    let output = wait::until(
        &format!("an SSH command on {} ({ip})", guest.name),
        SSH_DEADLINE,
        POLL,
        || {
            ssh(
                sandbox,
                ip,
                client_key,
                &known_hosts,
                "hostname; cat /etc/machine-id; sudo -n true && echo sudo-ok",
            )
        },
    )
    .await?;
    timings.first_command = boot.elapsed();
    let lines: Vec<&str> = output.lines().collect();
    let [hostname, machine_id, sudo] = lines.as_slice() else {
        bail!("unexpected answer from {}: {output:?}", guest.name);
    };
    ensure!(
        *hostname == guest.name,
        "{ip} says it is {hostname:?}, not {}",
        guest.name
    );
    ensure!(
        machine_id.len() == 32 && machine_id.chars().all(|c| c.is_ascii_hexdigit()),
        "{} has machine-id {machine_id:?}",
        guest.name
    );
    ensure!(
        *sudo == "sudo-ok",
        "passwordless sudo failed on {}",
        guest.name
    );

    // The guest's own account of its boot (firmware and GRUB excluded).
    if let Some(analysis) = ssh(
        sandbox,
        ip,
        client_key,
        &known_hosts,
        "systemd-analyze time | head -n 1",
    )
    .await?
    {
        eprintln!("{}: {}", guest.name, analysis.trim());
    }

    // A host key other than the pinned one: refused before any command runs.
    let impostor = HostKey::generate()?;
    let wrong_known_hosts = sandbox.dir().join(format!("{}.wrong", guest.name));
    std::fs::write(
        &wrong_known_hosts,
        format!("{ip} {}\n", impostor.public_openssh),
    )?;
    match ssh(sandbox, ip, client_key, &wrong_known_hosts, "echo ran").await {
        Ok(Some(out)) => bail!("ssh with a wrong pinned host key ran a command: {out:?}"),
        Ok(None) => {}
        Err(error) => bail!("{error:#}"),
    }
    Ok((timings, (*machine_id).to_owned()))
}

/// Runs `command` on `user@ip` over ssh inside the namespace, with strict host key
/// checking against `known_hosts` only. `Ok(None)` when ssh could not connect or the
/// host key did not match (so a caller may poll), `Ok(Some(stdout))` on success.
async fn ssh(
    sandbox: &Sandbox,
    ip: Ipv4Addr,
    client_key: &Path,
    known_hosts: &Path,
    command: &str,
) -> anyhow::Result<Option<String>> {
    let mut ssh = sandbox.command("ssh");
    ssh.args(["-F", "/dev/null", "-i"])
        .arg(client_key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "HostKeyAlgorithms=ssh-ed25519",
            "-o",
            &format!("ConnectTimeout={SSH_CONNECT_TIMEOUT_SECONDS}"),
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .arg(format!("{USER}@{ip}"))
        .arg(command);
    let output = tokio::process::Command::from(ssh)
        .kill_on_drop(true)
        .output()
        .await
        .context("running ssh")?;
    if output.status.success() {
        return Ok(Some(String::from_utf8_lossy(&output.stdout).into_owned()));
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    // 255: ssh itself failed (connection, authentication, host key); anything else is
    // the remote command's status, which the callers never expect.
    if output.status.code() == Some(255) {
        return Ok(None);
    }
    bail!("ssh {ip} {command:?} failed ({}): {stderr}", output.status)
}

/// The domain as the controller shapes it (pc machine, BIOS, overlay as vda, seed,
/// one virtio NIC, serial console, virtio RNG), plus a console log file for the test.
fn domain_xml(guest: &Guest, overlay: &str, seed_volume: &str) -> String {
    let seed_disk = format!(
        "<disk type='volume' device='disk'>
      <driver name='qemu' type='raw'/>
      <source pool='{NODE_POOL}' volume='{seed_volume}'/>
      <target dev='vdb' bus='virtio'/>
      <readonly/>
    </disk>"
    );
    format!(
        "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>1024</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <boot dev='hd'/>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <disk type='volume' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source pool='{NODE_POOL}' volume='{overlay}'/>
      <target dev='vda' bus='virtio'/>
    </disk>
    {seed_disk}
    <interface type='network'>
      <mac address='{mac}'/>
      <source network='{NETWORK}'/>
      <model type='virtio'/>
    </interface>
    <serial type='pty'>
      <log file='{console_log}' append='off'/>
      <target port='0'/>
    </serial>
    <console type='pty'>
      <target type='serial' port='0'/>
    </console>
    <rng model='virtio'>
      <backend model='random'>/dev/urandom</backend>
    </rng>
  </devices>
</domain>
",
        name = guest.name,
        mac = guest.mac,
        console_log = guest.console_log.display(),
    )
}

fn path_str(path: &Path) -> String {
    path.to_str().expect("test paths are UTF-8").to_owned()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| format!("<{e}>"));
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
