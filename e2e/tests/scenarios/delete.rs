//! The BenchCluster deleted: no domain, overlay, seed or kubeconfig Secret of it
//! remains, and the image pool is as it was.

use std::time::Instant;

use anyhow::ensure;
use benchcluster_e2e::sandbox::{IMAGE_POOL, NODE_POOL};
use benchcluster_e2e::wait;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams};

use super::{Bed, DELETE_DEADLINE};
use crate::vm_support::{POLL, volumes};

pub const NAME: &str = "delete";

pub fn run(bed: &Bed) -> BoxFuture<'_, anyhow::Result<()>> {
    Box::pin(async move {
        let start = Instant::now();
        let images = volumes(&bed.uri, IMAGE_POOL).await?;
        bed.api.delete(&bed.name, &DeleteParams::default()).await?;
        wait::until(
            "the BenchCluster to be gone",
            DELETE_DEADLINE,
            POLL,
            || async { anyhow::Ok(bed.api.get_opt(&bed.name).await?.is_none().then_some(())) },
        )
        .await?;
        eprintln!("  deleted in {:.1?}", start.elapsed());
        let domains = bed.domains().await?;
        ensure!(domains.is_empty(), "domains left: {domains:?}");
        let prefix = bed.domain_prefix();
        let left: Vec<String> = volumes(&bed.uri, NODE_POOL)
            .await?
            .into_iter()
            .filter(|v| v.starts_with(&prefix))
            .collect();
        ensure!(left.is_empty(), "volumes left in {NODE_POOL}: {left:?}");
        ensure!(
            volumes(&bed.uri, IMAGE_POOL).await? == images,
            "the image pool changed"
        );
        let kubeconfig = format!("{}-kubeconfig", bed.name);
        ensure!(
            Api::<Secret>::namespaced(bed.client.clone(), &bed.namespace)
                .get_opt(&kubeconfig)
                .await?
                .is_none(),
            "{kubeconfig} left behind"
        );
        Ok(())
    })
}
