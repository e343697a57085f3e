//! The Secrets the act stage reads and writes: the user's SSH key pair, and the
//! `<name>-kubeconfig` Secret holding the guest cluster's admin kubeconfig.

use benchcluster_crd::BenchCluster;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{DeleteParams, ObjectMeta, Patch, PatchParams};
use kube::{Api, Resource, ResourceExt};
use secrecy::{ExposeSecret, SecretString};

use super::super::context::{Context, FIELD_MANAGER};
use super::super::observe::KUBECONFIG_KEY;
use super::super::secret_index::MANAGED_BY;
use crate::error::{Error, Result};
use crate::guest::{AdminKubeconfig, Credentials, Guest};
use crate::hypervisor::Hypervisor;
use crate::names::ClusterNames;

/// Keys of a `kubernetes.io/ssh-auth` Secret.
pub const SSH_PRIVATE_KEY: &str = "ssh-privatekey";
pub const SSH_PUBLIC_KEY: &str = "ssh-publickey";

/// The SSH key pair of the BenchCluster's `spec.ssh.keySecret`.
pub(super) async fn ssh_credentials<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    ctx: &Context<H, G>,
) -> Result<Credentials> {
    let namespace = bc.namespace().ok_or(Error::MissingMetadata("namespace"))?;
    let name = bc.spec.ssh.key_secret.name.clone();
    let secret = ctx
        .secrets
        .ssh_key(&ctx.client, &namespace, &name)
        .await
        .map_err(Error::kube("read the SSH key Secret"))?
        .ok_or_else(|| Error::SshKeySecret {
            name: name.clone(),
            problem: "not found",
        })?;
    let data = secret.data.as_ref();
    let key = data
        .and_then(|d| d.get(SSH_PRIVATE_KEY))
        .ok_or_else(|| Error::SshKeySecret {
            name: name.clone(),
            problem: "has no ssh-privatekey",
        })?;
    let key = std::str::from_utf8(&key.0).map_err(|_| Error::SshKeySecret {
        name: name.clone(),
        problem: "ssh-privatekey is not UTF-8",
    })?;
    let public_key = data
        .and_then(|d| d.get(SSH_PUBLIC_KEY))
        .and_then(|k| std::str::from_utf8(&k.0).ok())
        .map(|k| k.trim().to_owned())
        .filter(|k| !k.is_empty() && !k.contains(['\n', '\r']))
        .ok_or_else(|| Error::SshKeySecret {
            name,
            problem: "has no single-line UTF-8 ssh-publickey",
        })?;
    Ok(Credentials {
        user: bc.spec.ssh.user.clone(),
        private_key: SecretString::from(key.to_owned()),
        public_key,
    })
}

/// Stores the admin kubeconfig in the `<name>-kubeconfig` Secret, owned by the
/// BenchCluster (so it goes with it).
pub(super) async fn store_kubeconfig<H: Hypervisor, G: Guest>(
    bc: &BenchCluster,
    names: &ClusterNames,
    kubeconfig: &AdminKubeconfig,
    ctx: &Context<H, G>,
) -> Result<()> {
    let owner = bc
        .controller_owner_ref(&())
        .ok_or(Error::MissingMetadata("uid"))?;
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(names.kubeconfig_secret()),
            namespace: Some(names.namespace.clone()),
            owner_references: Some(vec![owner]),
            labels: Some([(MANAGED_BY.to_owned(), FIELD_MANAGER.to_owned())].into()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(
            [(
                KUBECONFIG_KEY.to_owned(),
                ByteString(kubeconfig.0.expose_secret().as_bytes().to_vec()),
            )]
            .into(),
        ),
        ..Secret::default()
    };
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    let stored = secrets
        .patch(
            &names.kubeconfig_secret(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(Error::kube("store the kubeconfig Secret"))?;
    ctx.secrets.stored(stored);
    Ok(())
}

/// Deletes the `<name>-kubeconfig` Secret; one already gone is no error.
pub async fn delete_kubeconfig<H: Hypervisor, G: Guest>(
    names: &ClusterNames,
    ctx: &Context<H, G>,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &names.namespace);
    match secrets
        .delete(&names.kubeconfig_secret(), &DeleteParams::default())
        .await
    {
        Ok(_) => {
            ctx.secrets
                .deleted(&names.namespace, &names.kubeconfig_secret());
            Ok(())
        }
        Err(kube::Error::Api(status)) if status.is_not_found() => {
            ctx.secrets
                .deleted(&names.namespace, &names.kubeconfig_secret());
            Ok(())
        }
        Err(e) => Err(Error::kube("delete the kubeconfig Secret")(e)),
    }
}
