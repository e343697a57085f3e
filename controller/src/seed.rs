//! Per-VM identity: a fresh SSH host key pair and the seed disk that carries it, the
//! hostname and the authorized key into the guest (see docs/image-contract.md).
//!
//! The seed is a small FAT file system labelled `CIDATA`: the NoCloud layout for images
//! with cloud-init, plus plain files under `benchcluster/` for images without it.

use std::io::{Cursor, Write};

use ssh_key::rand_core::OsRng;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

use secrecy::{ExposeSecret, SecretString};

use crate::names::KeyTag;

/// Size of the seed disk; FAT12 needs a little room for its tables, the files are tiny.
const SEED_BYTES: usize = 1024 * 1024;
const LABEL: [u8; 11] = *b"CIDATA     ";

/// Why a seed could not be made.
#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("generating the SSH host key")]
    HostKey(#[source] ssh_key::Error),
    #[error("writing the seed file system")]
    Fat(#[source] std::io::Error),
    #[error("the SSH host key's fingerprint is not a SHA-256 digest")]
    Fingerprint,
    #[error("{field} contains a character that cannot be put into the seed")]
    Unrepresentable { field: &'static str },
}

/// A VM's SSH host key pair. The private half only ever goes into the seed disk.
pub struct HostKey {
    pub private_openssh: SecretString,
    /// `ssh-ed25519 AAAA...`: what the controller pins.
    pub public_openssh: String,
    fingerprint: String,
    tag: KeyTag,
}

impl HostKey {
    /// SHA-256 fingerprint of the public key, as `ssh-keygen -l` prints it.
    pub fn fingerprint(&self) -> String {
        self.fingerprint.clone()
    }

    pub fn generate() -> Result<Self, SeedError> {
        let key = PrivateKey::random(&mut OsRng, Algorithm::Ed25519).map_err(SeedError::HostKey)?;
        let private = key.to_openssh(LineEnding::LF).map_err(SeedError::HostKey)?;
        let public = key.public_key().to_openssh().map_err(SeedError::HostKey)?;
        let fingerprint = key.fingerprint(ssh_key::HashAlg::Sha256);
        Ok(Self {
            private_openssh: SecretString::from(private.as_str()),
            public_openssh: public,
            tag: KeyTag::from_sha256(fingerprint.as_bytes()).ok_or(SeedError::Fingerprint)?,
            fingerprint: fingerprint.to_string(),
        })
    }

    /// What names the seed carrying this key.
    pub fn tag(&self) -> &KeyTag {
        &self.tag
    }
}

/// The tag of a pinned public key (`ssh-ed25519 AAAA...`), the same one
/// [`HostKey::tag`] gave it: it names the seed a domain pinning that key boots from.
/// `None` for a text that is no OpenSSH public key.
pub fn key_tag(public_openssh: &str) -> Option<KeyTag> {
    let key = ssh_key::PublicKey::from_openssh(public_openssh.trim()).ok()?;
    KeyTag::from_sha256(key.fingerprint(ssh_key::HashAlg::Sha256).as_bytes())
}

/// What one VM is told about itself.
pub struct Identity<'a> {
    /// Hostname and Kubernetes node name.
    pub hostname: &'a str,
    /// Unique per VM incarnation (NoCloud `instance-id`).
    pub instance_id: &'a str,
    pub user: &'a str,
    pub authorized_key: &'a str,
    pub host_key: &'a HostKey,
}

fn single_line(field: &'static str, value: &str) -> Result<(), SeedError> {
    if value.is_empty() || value.chars().any(|c| c.is_control()) {
        return Err(SeedError::Unrepresentable { field });
    }
    Ok(())
}

/// Quotes a value for YAML as a JSON string (a subset of YAML), so no user value can
/// break the document's structure.
fn yaml_string(value: &str) -> String {
    serde_json::Value::String(value.to_owned()).to_string()
}

/// Builds the seed disk image.
pub fn build(identity: &Identity<'_>) -> Result<Vec<u8>, SeedError> {
    single_line("hostname", identity.hostname)?;
    single_line("instance id", identity.instance_id)?;
    single_line("user", identity.user)?;
    single_line("authorized key", identity.authorized_key.trim_end())?;
    single_line("host public key", &identity.host_key.public_openssh)?;
    let authorized_key = identity.authorized_key.trim_end();

    let meta_data = format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        yaml_string(identity.instance_id),
        yaml_string(identity.hostname)
    );
    let private = identity.host_key.private_openssh.expose_secret();
    let indented: String = private.lines().map(|l| format!("    {l}\n")).collect();
    let user_data = format!(
        "#cloud-config\nhostname: {host}\nfqdn: {host}\nssh_pwauth: false\nssh_deletekeys: true\n\
         users:\n  - name: {user}\n    sudo: \"ALL=(ALL) NOPASSWD:ALL\"\n    shell: /bin/bash\n    ssh_authorized_keys:\n      - {key}\n\
         ssh_keys:\n  ed25519_private: |\n{indented}  ed25519_public: {public}\n",
        host = yaml_string(identity.hostname),
        user = yaml_string(identity.user),
        key = yaml_string(authorized_key),
        public = yaml_string(&identity.host_key.public_openssh),
    );

    let mut disk = Cursor::new(vec![0u8; SEED_BYTES]);
    fatfs::format_volume(
        &mut disk,
        fatfs::FormatVolumeOptions::new().volume_label(LABEL),
    )
    .map_err(SeedError::Fat)?;
    {
        let fs =
            fatfs::FileSystem::new(&mut disk, fatfs::FsOptions::new()).map_err(SeedError::Fat)?;
        write_files(
            &fs.root_dir(),
            &meta_data,
            &user_data,
            identity,
            authorized_key,
        )?;
        fs.unmount().map_err(SeedError::Fat)?;
    }
    Ok(disk.into_inner())
}

fn write_files<T: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'_, T>,
    meta_data: &str,
    user_data: &str,
    identity: &Identity<'_>,
    authorized_key: &str,
) -> Result<(), SeedError> {
    let private = identity.host_key.private_openssh.expose_secret();
    {
        let files: [(&str, &[u8]); 2] = [
            ("meta-data", meta_data.as_bytes()),
            ("user-data", user_data.as_bytes()),
        ];
        for (name, content) in files {
            root.create_file(name)
                .and_then(|mut f| f.write_all(content))
                .map_err(SeedError::Fat)?;
        }
        let dir = root.create_dir("benchcluster").map_err(SeedError::Fat)?;
        let files: [(&str, String); 5] = [
            ("hostname", format!("{}\n", identity.hostname)),
            ("user", format!("{}\n", identity.user)),
            ("authorized_keys", format!("{authorized_key}\n")),
            ("ssh_host_ed25519_key", private.to_owned()),
            (
                "ssh_host_ed25519_key.pub",
                format!("{}\n", identity.host_key.public_openssh),
            ),
        ];
        for (name, content) in files {
            dir.create_file(name)
                .and_then(|mut f| f.write_all(content.as_bytes()))
                .map_err(SeedError::Fat)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use std::io::Read;

    fn read(image: &[u8], path: &str) -> String {
        let fs =
            fatfs::FileSystem::new(Cursor::new(image.to_vec()), fatfs::FsOptions::new()).unwrap();
        let mut text = String::new();
        fs.root_dir()
            .open_file(path)
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        text
    }

    #[test]
    fn seed_carries_identity_in_both_layouts() {
        let key = HostKey::generate().unwrap();
        assert!(key.public_openssh.starts_with("ssh-ed25519 "));
        let image = build(&Identity {
            hostname: "small-w-3",
            instance_id: "uid-w-3",
            user: "bench",
            authorized_key: "ssh-ed25519 AAAAC3Nza user@host\n",
            host_key: &key,
        })
        .unwrap();
        let fs =
            fatfs::FileSystem::new(Cursor::new(image.clone()), fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label(), "CIDATA");
        assert_eq!(read(&image, "benchcluster/hostname"), "small-w-3\n");
        assert_eq!(
            read(&image, "benchcluster/ssh_host_ed25519_key.pub"),
            format!("{}\n", key.public_openssh)
        );
        assert_eq!(
            read(&image, "benchcluster/ssh_host_ed25519_key"),
            key.private_openssh.expose_secret()
        );
        assert!(read(&image, "meta-data").contains("local-hostname: \"small-w-3\""));
        let user_data = read(&image, "user-data");
        assert!(user_data.starts_with("#cloud-config\n"));
        assert!(user_data.contains("- \"ssh-ed25519 AAAAC3Nza user@host\""));
    }

    #[test]
    fn fresh_host_keys_differ() {
        let a = HostKey::generate().unwrap();
        let b = HostKey::generate().unwrap();
        assert_ne!(a.public_openssh, b.public_openssh);
        assert!(!format!("{:?}", a.private_openssh).contains("PRIVATE"));
    }

    #[test]
    fn a_pinned_key_names_the_seed_of_the_host_key_it_came_from() {
        let a = HostKey::generate().unwrap();
        let b = HostKey::generate().unwrap();
        assert_eq!(key_tag(&a.public_openssh).as_ref(), Some(a.tag()));
        assert_ne!(a.tag(), b.tag());
        // The tag is the start of the fingerprint `ssh-keygen -l` prints.
        let printed = a.fingerprint();
        let digest = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD_NO_PAD
                .decode(printed.strip_prefix("SHA256:").unwrap())
                .unwrap()
        };
        assert_eq!(KeyTag::from_sha256(&digest).as_ref(), Some(a.tag()));
        // A comment after the key does not change it; what is no key has none.
        let commented = format!("{} root@small-w-3", a.public_openssh);
        assert_eq!(key_tag(&commented).as_ref(), Some(a.tag()));
        assert_eq!(key_tag("ssh-ed25519 not-base64"), None);
        assert_eq!(key_tag(""), None);
    }

    #[test]
    fn control_characters_are_refused() {
        let key = HostKey::generate().unwrap();
        for bad in ["a\nb", "a\rb", ""] {
            let result = build(&Identity {
                hostname: "n",
                instance_id: "i",
                user: "bench",
                authorized_key: bad,
                host_key: &key,
            });
            assert!(
                matches!(result, Err(SeedError::Unrepresentable { .. })),
                "{bad:?}"
            );
        }
    }
}
