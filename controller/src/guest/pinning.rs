//! Host-key pinning and the SSH guest's local state files: the private key, a
//! known_hosts file holding only the key pinned for one VM, and the ssh_config that
//! uses both with strict checking. All are mode 0600 under the state directory (itself
//! 0700), named by their content and never rewritten.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};

use super::ssh::{SshGuest, local_error};
use super::{Credentials, GuestNode, Result};

impl SshGuest {
    pub(super) fn dir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.config.state_dir.join(name);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|e| local_error("create state directory", &e))?;
        Ok(dir)
    }

    /// Writes the private key to a 0600 file named by its hash (written once).
    pub(super) fn key_file(&self, credentials: &Credentials) -> Result<PathBuf> {
        let digest = Sha256::digest(credentials.private_key.expose_secret().as_bytes());
        let path = self.dir("keys")?.join(hex(&digest[..12]));
        let mut key = credentials.private_key.expose_secret().to_owned();
        if !key.ends_with('\n') {
            key.push('\n'); // ssh refuses a key without its final newline
        }
        write_once(&path, key.as_bytes())?;
        Ok(path)
    }

    /// An ssh_config pinning exactly the node's host key.
    ///
    /// Both files are named by the node and a hash of their content, and never
    /// rewritten: connections to one node run concurrently (two workers joining both
    /// mint a token on the control plane), and one pinning another key (a recreated
    /// VM, a stale pass) must not swap the file under another's feet.
    pub(super) fn ssh_config(&self, node: &GuestNode, key: &Path) -> Result<PathBuf> {
        let pinned = format!("{} {}\n", node.name, node.host_key);
        let known_hosts = self
            .dir("known_hosts")?
            .join(content_named(&node.name, &pinned));
        write_once(&known_hosts, pinned.as_bytes())?;
        let text = format!(
            "Host *\n  HostKeyAlias {alias}\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  \
             StrictHostKeyChecking yes\n  CheckHostIP no\n  UpdateHostKeys no\n  HostKeyAlgorithms ssh-ed25519\n  \
             IdentityFile {key}\n  IdentitiesOnly yes\n  PasswordAuthentication no\n  \
             KbdInteractiveAuthentication no\n  BatchMode yes\n  LogLevel ERROR\n  ServerAliveInterval 15\n",
            alias = node.name,
            kh = known_hosts.display(),
            key = key.display(),
        );
        let config = self
            .dir("ssh_config")?
            .join(content_named(&node.name, &text));
        write_once(&config, text.as_bytes())?;
        Ok(config)
    }
}

/// `<name>.<16 hex digits of the content's SHA-256>`.
fn content_named(name: &str, content: &str) -> String {
    format!("{name}.{}", hex(&Sha256::digest(content.as_bytes())[..8]))
}

/// Writes a file whose name determines its content, unless it exists already.
fn write_once(path: &Path, content: &[u8]) -> Result<()> {
    if path.exists() {
        return Ok(());
    }
    write_private(path, content)
}

/// Writes `content` to `path` (mode 0600) through a temporary file of this call's own,
/// renamed into place: concurrent writers of one path never see a partial file, and
/// never rename each other's temporary file away.
fn write_private(path: &Path, content: &[u8]) -> Result<()> {
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        WRITES.fetch_add(1, Ordering::Relaxed)
    ));
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| local_error("write state file", &e))?;
    let written = file
        .write_all(content)
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written.map_err(|e| local_error("write state file", &e))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::guest::ssh::SshConfig;
    use crate::guest::ssh::tests::node;

    #[test]
    fn concurrent_pins_of_one_node_never_fail_nor_mix_keys() {
        let dir = std::env::temp_dir().join(format!(
            "benchcluster-ssh-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let guest = SshGuest::new(SshConfig {
            state_dir: dir.clone(),
            ..SshConfig::default()
        });
        let keys = ["ssh-ed25519 AAAAC3NzaKeyA", "ssh-ed25519 AAAAC3NzaKeyB"];
        let configs: Vec<(usize, PathBuf)> = std::thread::scope(|scope| {
            let workers: Vec<_> = (0..8)
                .map(|t| {
                    let guest = &guest;
                    scope.spawn(move || {
                        (0..25)
                            .map(|_| {
                                let mut pinned = node("x-cp-0");
                                pinned.host_key = keys[t % 2].to_owned();
                                let config =
                                    guest.ssh_config(&pinned, Path::new("/keys/k")).unwrap();
                                (t % 2, config)
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            workers
                .into_iter()
                .flat_map(|w| w.join().unwrap())
                .collect()
        });
        for (key, config) in configs {
            let text = std::fs::read_to_string(&config).unwrap();
            let known_hosts = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("UserKnownHostsFile "))
                .unwrap();
            let pinned = std::fs::read_to_string(known_hosts).unwrap();
            assert_eq!(pinned, format!("x-cp-0 {}\n", keys[key]));
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.join("known_hosts"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 2, "{leftovers:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
