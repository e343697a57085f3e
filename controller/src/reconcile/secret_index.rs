//! The Secrets passes read, from watches instead of a GET per pass: the kubeconfig
//! Secrets this controller owns and the users' `kubernetes.io/ssh-auth` key Secrets.
//!
//! The run loop fills two reflector stores and installs them here once both have listed
//! everything; until then (and in tests that drive passes by hand) a lookup reads the
//! API directly. A kubeconfig this process stored or deleted is remembered until the
//! watch shows it: a pass that collects `kubeadm init` stores the kubeconfig and
//! observes in the same breath, and must not find the cluster uninitialised.
//!
//! An SSH key Secret of another type is outside the watch: it is read directly, and a
//! change of it triggers no pass (documented with `spec.ssh.keySecret`).

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Api, Client, ResourceExt};
use parking_lot::{Mutex, RwLock};

/// Label on every Secret the controller writes; the kubeconfig watch selects on it.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";

/// Field selector of the SSH key watch.
pub const SSH_AUTH_TYPE: &str = "type=kubernetes.io/ssh-auth";

/// The watched Secrets, once both stores have synced.
#[derive(Clone)]
pub struct Stores {
    pub kubeconfigs: Store<Secret>,
    pub ssh_keys: Store<Secret>,
}

/// What this process did to a kubeconfig Secret that its watch may not show yet.
#[derive(Debug, Clone)]
enum Written {
    /// Stored: the API server's answer to the write.
    Stored(Arc<Secret>),
    /// Deleted when the newest copy known had this revision.
    Deleted { known: Option<u64> },
}

#[derive(Default)]
pub struct SecretIndex {
    stores: RwLock<Option<Stores>>,
    written: Mutex<HashMap<(String, String), Written>>,
}

fn revision(secret: &Secret) -> Option<u64> {
    secret.resource_version()?.parse().ok()
}

/// The kubeconfig Secret a pass should see, given this process's own last write and the
/// watched copy; and whether the memory of that write can go (the watch caught up, or
/// someone else wrote since).
fn reconcile_view(
    written: Option<&Written>,
    watched: Option<Arc<Secret>>,
) -> (Option<Arc<Secret>>, bool) {
    match written {
        None => (watched, false),
        Some(Written::Stored(ours)) => match watched {
            Some(seen) if revision(&seen) >= revision(ours) => (Some(seen), true),
            _ => (Some(Arc::clone(ours)), false),
        },
        Some(Written::Deleted { known }) => match watched {
            None => (None, true),
            Some(seen) if revision(&seen) > *known => (Some(seen), true),
            Some(_) => (None, false),
        },
    }
}

impl SecretIndex {
    /// Lookups answer from `stores` from now on.
    pub fn install(&self, stores: Stores) {
        *self.stores.write() = Some(stores);
    }

    /// Lookups read the API again (the watches stopped).
    pub fn uninstall(&self) {
        *self.stores.write() = None;
    }

    /// Whether lookups answer from the watches.
    pub fn watching(&self) -> bool {
        self.stores.read().is_some()
    }

    /// The `<name>-kubeconfig` Secret, if it exists.
    pub async fn kubeconfig(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> kube::Result<Option<Arc<Secret>>> {
        let key = (namespace.to_owned(), name.to_owned());
        let stores = self.stores.read().clone();
        let Some(stores) = stores else {
            // The API itself is the truth; nothing to remember.
            self.written.lock().remove(&key);
            return direct(client, namespace, name).await;
        };
        let watched = stores
            .kubeconfigs
            .get(&ObjectRef::new(name).within(namespace));
        let mut written = self.written.lock();
        let (view, caught_up) = reconcile_view(written.get(&key), watched);
        if caught_up {
            written.remove(&key);
        }
        Ok(view)
    }

    /// The SSH key Secret a BenchCluster names, if it exists.
    pub async fn ssh_key(
        &self,
        client: &Client,
        namespace: &str,
        name: &str,
    ) -> kube::Result<Option<Arc<Secret>>> {
        let stores = self.stores.read().clone();
        if let Some(secret) =
            stores.and_then(|s| s.ssh_keys.get(&ObjectRef::new(name).within(namespace)))
        {
            return Ok(Some(secret));
        }
        // Not watched (not yet synced, or not of type kubernetes.io/ssh-auth).
        direct(client, namespace, name).await
    }

    /// Remembers a kubeconfig Secret this process stored, as the API server returned it.
    pub fn stored(&self, secret: Secret) {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        self.written
            .lock()
            .insert(key, Written::Stored(Arc::new(secret)));
    }

    /// Remembers that this process deleted the kubeconfig Secret.
    pub fn deleted(&self, namespace: &str, name: &str) {
        let key = (namespace.to_owned(), name.to_owned());
        let mut written = self.written.lock();
        let ours = match written.get(&key) {
            Some(Written::Stored(secret)) => revision(secret),
            Some(Written::Deleted { known }) => *known,
            None => None,
        };
        let watched = self
            .stores
            .read()
            .as_ref()
            .and_then(|s| s.kubeconfigs.get(&ObjectRef::new(name).within(namespace)))
            .and_then(|s| revision(&s));
        written.insert(
            key,
            Written::Deleted {
                known: ours.max(watched),
            },
        );
    }
}

async fn direct(client: &Client, namespace: &str, name: &str) -> kube::Result<Option<Arc<Secret>>> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    Ok(secrets.get_opt(name).await?.map(Arc::new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    fn secret(revision: u64) -> Arc<Secret> {
        Arc::new(Secret {
            metadata: ObjectMeta {
                name: Some("c-kubeconfig".into()),
                namespace: Some("ns".into()),
                resource_version: Some(revision.to_string()),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        })
    }

    fn seen(view: &(Option<Arc<Secret>>, bool)) -> (Option<u64>, bool) {
        (view.0.as_deref().and_then(revision), view.1)
    }

    #[test]
    fn a_stored_kubeconfig_is_seen_before_the_watch_shows_it() {
        let ours = Written::Stored(secret(7));
        assert_eq!(seen(&reconcile_view(Some(&ours), None)), (Some(7), false));
        assert_eq!(
            seen(&reconcile_view(Some(&ours), Some(secret(5)))),
            (Some(7), false),
            "an older watched copy"
        );
        assert_eq!(
            seen(&reconcile_view(Some(&ours), Some(secret(7)))),
            (Some(7), true),
            "the watch caught up"
        );
        assert_eq!(
            seen(&reconcile_view(Some(&ours), Some(secret(9)))),
            (Some(9), true),
            "written again since"
        );
    }

    #[test]
    fn a_deleted_kubeconfig_stays_gone_until_the_watch_agrees_or_it_is_recreated() {
        let gone = Written::Deleted { known: Some(7) };
        assert_eq!(
            seen(&reconcile_view(Some(&gone), Some(secret(7)))),
            (None, false)
        );
        assert_eq!(seen(&reconcile_view(Some(&gone), None)), (None, true));
        assert_eq!(
            seen(&reconcile_view(Some(&gone), Some(secret(8)))),
            (Some(8), true),
            "recreated by someone after the deletion"
        );
        assert_eq!(
            seen(&reconcile_view(None, Some(secret(3)))),
            (Some(3), false)
        );
    }
}
