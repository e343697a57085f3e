//! Pool `small` scaled 1 -> 2 -> 1 by edits while pool `gpu` is left alone. The first
//! join token the controller mints for the new worker is deleted on the control plane
//! before the worker can use it: a fresh one is minted and the worker joins
//! (RELIABILITY.md 14). Scaled back, the highest index is drained, its Node, domain and
//! disks go. The gpu node keeps its domain (UUID) and its Node (uid) throughout.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use anyhow::{Context as _, ensure};
use benchcluster_e2e::wait;
use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams};
use kube::runtime::watcher;

use super::{Bed, SCALE_DOWN_DEADLINE, SCALE_UP_DEADLINE, print_timings};
use crate::vm_support::volumes;

pub const NAME: &str = "scale";

pub fn run(bed: &Bed) -> BoxFuture<'_, anyhow::Result<()>> {
    Box::pin(async move {
        let gpu = format!("{}-gpu-0", bed.name);
        let added = format!("{}-small-1", bed.name);
        let gpu_domain = bed.domain_uuid(&gpu).await?;
        let gpu_uid = bed.node_uids().await?.get(&gpu).cloned();
        let before = bed.domains().await?.len();

        // Up: one more worker in pool small, its first join token deleted.
        let start = Instant::now();
        let tokens = TokenThief::start(bed.guest_client().await?).await?;
        let joins_before = bed.log.count(&["started", "operation=\"kubeadm join\""]);
        bed.scale_pool("small", 2).await?;
        let bc = bed
            .wait_ready("pool small at 2 to be Ready", SCALE_UP_DEADLINE)
            .await?;
        let grown = start.elapsed();
        let (minted, stolen) = tokens.stop();
        eprintln!(
            "  small 1 -> 2 Ready in {grown:.1?}; join tokens minted {minted}, deleted by the \
             test {stolen}"
        );
        ensure!(stolen == 1, "the test deleted {stolen} join tokens, want 1");
        ensure!(
            minted >= 2,
            "only {minted} join token(s) minted: the deleted one was not replaced"
        );
        let joins = bed.log.count(&["started", "operation=\"kubeadm join\""]) - joins_before;
        ensure!(
            joins >= 2,
            "the deleted token's join was not followed by a fresh one ({joins} joins):\n{}",
            bed.log.matching("kubeadm join")
        );
        print_timings(&bc);
        bed.check_guest_nodes().await?;
        ensure!(
            bed.domains().await?.len() == before + 1,
            "domains: {:?}",
            bed.domains().await?
        );

        // Down: the added worker goes, with its disks.
        let start = Instant::now();
        bed.scale_pool("small", 1).await?;
        let bc = bed
            .wait_ready("pool small back at 1", SCALE_DOWN_DEADLINE)
            .await?;
        eprintln!("  small 2 -> 1 in {:.1?}", start.elapsed());
        ensure!(
            bc.status_or_default().nodes.iter().all(|n| n.name != added),
            "{added} still in status"
        );
        bed.check_guest_nodes().await?;
        let removed = format!("{}-{added}", bed.namespace);
        let domains = bed.domains().await?;
        ensure!(
            !domains.contains(&removed) && domains.len() == before,
            "{removed} still defined: {domains:?}"
        );
        let left = volumes(&bed.uri, benchcluster_e2e::sandbox::NODE_POOL).await?;
        ensure!(
            !left.iter().any(|v| v.starts_with(&format!("{removed}."))),
            "{removed}'s disks left: {left:?}"
        );

        // Pool gpu untouched.
        ensure!(
            bed.domain_uuid(&gpu).await? == gpu_domain,
            "{gpu}'s domain was replaced"
        );
        ensure!(
            bed.node_uids().await?.get(&gpu).cloned() == gpu_uid,
            "{gpu}'s Node was replaced"
        );
        eprintln!("  {gpu}: same domain UUID and Node uid throughout");
        Ok(())
    })
}

/// Deletes the first bootstrap token minted after it started, as soon as it appears
/// (a watch on kube-system, well before the worker's kubeadm join can use it), and
/// counts the tokens minted meanwhile.
struct TokenThief {
    minted: Arc<Mutex<BTreeSet<String>>>,
    stolen: Arc<Mutex<BTreeSet<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl TokenThief {
    async fn start(client: Client) -> anyhow::Result<TokenThief> {
        let secrets: Api<Secret> = Api::namespaced(client, "kube-system");
        let tokens = ListParams::default().fields("type=bootstrap.kubernetes.io/token");
        let existing: BTreeSet<String> = secrets
            .list(&tokens)
            .await
            .context("listing the bootstrap tokens")?
            .items
            .into_iter()
            .filter_map(|s| s.metadata.name)
            .collect();
        let minted = Arc::new(Mutex::new(BTreeSet::new()));
        let stolen = Arc::new(Mutex::new(BTreeSet::new()));
        let (seen, taken) = (Arc::clone(&minted), Arc::clone(&stolen));
        let config = watcher::Config::default().fields("type=bootstrap.kubernetes.io/token");
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(watcher::watcher(secrets.clone(), config));
            while let Some(event) = events.next().await {
                let (watcher::Event::Apply(secret) | watcher::Event::InitApply(secret)) =
                    (match event {
                        Ok(event) => event,
                        Err(error) => {
                            eprintln!("  token watch: {error}");
                            continue;
                        }
                    })
                else {
                    continue;
                };
                let Some(name) = secret.metadata.name else {
                    continue;
                };
                if existing.contains(&name) {
                    continue;
                }
                let first = {
                    let mut seen = seen.lock().unwrap_or_else(PoisonError::into_inner);
                    seen.insert(name.clone()) && seen.len() == 1
                };
                if first {
                    match secrets.delete(&name, &DeleteParams::default()).await {
                        Ok(_) => {
                            eprintln!("  [{}] deleted the new join token {name}", wait::clock());
                            taken
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .insert(name);
                        }
                        Err(error) => eprintln!("  deleting {name}: {error}"),
                    }
                }
            }
        });
        Ok(TokenThief {
            minted,
            stolen,
            task,
        })
    }

    /// Tokens minted and tokens deleted since the start.
    fn stop(self) -> (usize, usize) {
        self.task.abort();
        let count = |set: &Mutex<BTreeSet<String>>| {
            set.lock().unwrap_or_else(PoisonError::into_inner).len()
        };
        (count(&self.minted), count(&self.stolen))
    }
}
