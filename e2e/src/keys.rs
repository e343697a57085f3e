//! The SSH client key pair a BenchCluster's `spec.ssh.keySecret` names, made the way its
//! owner would make it (`ssh-keygen -t ed25519`), and the Secret holding it.

use anyhow::Context as _;
use benchcluster_controller::guest::Credentials;
use benchcluster_controller::reconcile::act::{SSH_PRIVATE_KEY, SSH_PUBLIC_KEY};
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, PostParams};
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;

/// A fresh ed25519 key pair for `user`; `comment` ends the public key's line.
pub fn client_credentials(user: &str, comment: &str) -> anyhow::Result<Credentials> {
    use ssh_key::rand_core::OsRng;
    let key = ssh_key::PrivateKey::random(&mut OsRng, ssh_key::Algorithm::Ed25519)?;
    let private = key.to_openssh(ssh_key::LineEnding::LF)?;
    let mut public = key.public_key().clone();
    public.set_comment(comment);
    Ok(Credentials {
        user: user.to_owned(),
        private_key: SecretString::from(private.as_str()),
        public_key: public.to_openssh()?,
    })
}

/// Creates the `kubernetes.io/ssh-auth` Secret `name` holding `credentials`' key pair.
pub async fn create_ssh_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    credentials: &Credentials,
) -> anyhow::Result<()> {
    let secret: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/ssh-auth",
        "stringData": {
            SSH_PRIVATE_KEY: credentials.private_key.expose_secret(),
            SSH_PUBLIC_KEY: credentials.public_key,
        }
    }))?;
    Api::<Secret>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &secret)
        .await
        .with_context(|| format!("creating the SSH key Secret {namespace}/{name}"))?;
    Ok(())
}

/// The key pair in the `kubernetes.io/ssh-auth` Secret `name` (as `create_ssh_secret`
/// writes it), to log in as `user`.
pub async fn read_ssh_secret(
    client: &Client,
    namespace: &str,
    name: &str,
    user: &str,
) -> anyhow::Result<Credentials> {
    let secret = Api::<Secret>::namespaced(client.clone(), namespace)
        .get(name)
        .await
        .with_context(|| format!("reading Secret {namespace}/{name}"))?;
    let data = secret.data.unwrap_or_default();
    let text = |key: &str| {
        data.get(key)
            .map(|v| String::from_utf8_lossy(&v.0).into_owned())
            .with_context(|| format!("Secret {namespace}/{name} has no {key}"))
    };
    Ok(Credentials {
        user: user.to_owned(),
        private_key: SecretString::from(text(SSH_PRIVATE_KEY)?),
        public_key: text(SSH_PUBLIC_KEY)?,
    })
}
