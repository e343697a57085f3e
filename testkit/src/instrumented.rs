//! A wrapper that instruments any hypervisor: counts the reads and mutations that
//! reach it, freezes a controller mid-pass, injects removal failures, models latency,
//! and keeps the seeds libvirt's test driver cannot store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use benchcluster_controller::hypervisor::{
    DomainOwner, DomainSpec, Hypervisor, Inventory, OverlaySpec,
};
use parking_lot::Mutex;

/// Wraps a hypervisor to count the calls that reach it (the steady state must cause
/// no mutation) and to freeze a controller mid-pass (restart tests).
pub struct Instrumented<H> {
    pub inner: H,
    /// Counts mutations that reached the hypervisor (define, start, remove...).
    pub mutations: AtomicU64,
    /// Counts reads that reached the hypervisor (inventories and owner look-ups).
    pub reads: AtomicU64,
    /// Counts the host-wide inventory reads among them.
    pub inventory_reads: AtomicU64,
    /// After this many domain definitions, every further one hangs forever: the process
    /// "dies" mid-pass, for restart tests.
    pub define_gate: Option<u64>,
    defines: AtomicU64,
    /// The same for domain starts: the process "dies" between define and start.
    pub start_gate: Option<u64>,
    starts: AtomicU64,
    /// Set for libvirt's test driver, which cannot upload into volumes: seeds are then
    /// created empty through libvirt in this pool, and their content kept here.
    pub recorded_seeds: Option<RecordedSeeds>,
    /// Added to every mutation, to model a real hypervisor's latency in benchmarks.
    pub step_latency: Duration,
    /// While set, every domain removal and volume deletion fails as libvirt would
    /// (the call does not reach the hypervisor).
    pub fail_removals: AtomicBool,
    /// Domain removals and volume deletions asked for, failed ones included.
    pub removal_attempts: AtomicU64,
}

/// Seeds of the test driver: volumes created through libvirt, content kept in memory.
pub struct RecordedSeeds {
    pub uri: String,
    pub pool: String,
    /// Seeds are 1 MiB each: kept only when asked, so benchmarks with hundreds of nodes
    /// measure the controller, not this record.
    keep: bool,
    /// Shared by [`RecordedSeeds::sharing`] copies; held while a seed is written, so
    /// the record is the content of the volume's only writer.
    pub content: Arc<Mutex<BTreeMap<String, Vec<u8>>>>,
    /// Seeds written, shared like `content`.
    pub writes: Arc<AtomicU64>,
}

impl RecordedSeeds {
    /// Creates the seed volumes; their content is dropped.
    pub fn new(uri: &str, pool: &str) -> Self {
        Self {
            uri: uri.to_owned(),
            pool: pool.to_owned(),
            keep: false,
            content: Arc::new(Mutex::new(BTreeMap::new())),
            writes: Arc::new(AtomicU64::new(0)),
        }
    }

    /// The same record for another hypervisor instance on the same pool (a second
    /// controller).
    pub fn sharing(&self) -> Self {
        Self {
            uri: self.uri.clone(),
            pool: self.pool.clone(),
            keep: self.keep,
            content: Arc::clone(&self.content),
            writes: Arc::clone(&self.writes),
        }
    }

    /// Creates the seed volumes and keeps their content for [`RecordedSeeds::get`].
    pub fn keeping(uri: &str, pool: &str) -> Self {
        Self {
            keep: true,
            ..Self::new(uri, pool)
        }
    }

    /// The content of a seed the controller wrote.
    pub fn get(&self, name: &str) -> Option<Vec<u8>> {
        self.content.lock().get(name).cloned()
    }

    fn create(&self, name: &str, content: &[u8]) -> Result<(), String> {
        let mut record = self.content.lock();
        let conn = virt::connect::Connect::open(Some(&self.uri)).map_err(|e| e.to_string())?;
        let pool = conn
            .lookup_storage_pool_by_name(&self.pool)
            .map_err(|e| e.to_string())?;
        // Never overwritten, as the libvirt implementation does.
        if pool.lookup_storage_vol_by_name(name).is_ok() {
            return Ok(());
        }
        let xml = format!(
            "<volume><name>{name}</name><capacity unit='bytes'>{}</capacity>\
             <allocation unit='bytes'>0</allocation><target><format type='raw'/></target></volume>",
            content.len()
        );
        virt::storage_vol::StorageVol::create_xml(&pool, &xml, 0).map_err(|e| e.to_string())?;
        self.writes.fetch_add(1, Ordering::Relaxed);
        if self.keep {
            record.insert(name.to_owned(), content.to_vec());
        }
        Ok(())
    }
}

impl<H> Instrumented<H> {
    pub fn new(inner: H) -> Self {
        Self {
            inner,
            mutations: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            inventory_reads: AtomicU64::new(0),
            define_gate: None,
            defines: AtomicU64::new(0),
            start_gate: None,
            starts: AtomicU64::new(0),
            recorded_seeds: None,
            step_latency: Duration::ZERO,
            fail_removals: AtomicBool::new(false),
            removal_attempts: AtomicU64::new(0),
        }
    }

    /// Counts a removal and fails it while [`Instrumented::fail_removals`] is set.
    fn removal(&self, operation: &'static str) -> benchcluster_controller::hypervisor::Result<()> {
        self.removal_attempts.fetch_add(1, Ordering::Relaxed);
        if !self.fail_removals.load(Ordering::Relaxed) {
            return Ok(());
        }
        Err(crate::hypervisor::libvirt_error(operation))
    }

    async fn mutated(&self) {
        self.mutations.fetch_add(1, Ordering::Relaxed);
        if !self.step_latency.is_zero() {
            tokio::time::sleep(self.step_latency).await;
        }
    }
}

impl<H: Hypervisor> Hypervisor for Instrumented<H> {
    async fn inventory(
        &self,
        networks: &[String],
    ) -> benchcluster_controller::hypervisor::Result<Inventory> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inventory_reads.fetch_add(1, Ordering::Relaxed);
        self.inner.inventory(networks).await
    }

    async fn domain_owner(
        &self,
        name: &str,
    ) -> benchcluster_controller::hypervisor::Result<DomainOwner> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        self.inner.domain_owner(name).await
    }

    async fn create_overlay(
        &self,
        spec: &OverlaySpec,
    ) -> benchcluster_controller::hypervisor::Result<()> {
        self.mutated().await;
        self.inner.create_overlay(spec).await
    }

    async fn define_domain(
        &self,
        spec: &DomainSpec,
    ) -> benchcluster_controller::hypervisor::Result<()> {
        let n = self.defines.fetch_add(1, Ordering::SeqCst);
        if self.define_gate.is_some_and(|gate| n >= gate) {
            std::future::pending::<()>().await;
        }
        self.mutated().await;
        self.inner.define_domain(spec).await
    }

    async fn start_domain(&self, name: &str) -> benchcluster_controller::hypervisor::Result<()> {
        let n = self.starts.fetch_add(1, Ordering::SeqCst);
        if self.start_gate.is_some_and(|gate| n >= gate) {
            std::future::pending::<()>().await;
        }
        self.mutated().await;
        self.inner.start_domain(name).await
    }

    async fn remove_domain(&self, name: &str) -> benchcluster_controller::hypervisor::Result<()> {
        self.removal("undefine domain (injected failure)")?;
        self.mutated().await;
        self.inner.remove_domain(name).await
    }

    async fn create_seed(
        &self,
        name: &str,
        content: &[u8],
    ) -> benchcluster_controller::hypervisor::Result<()> {
        self.mutated().await;
        match &self.recorded_seeds {
            None => self.inner.create_seed(name, content).await,
            Some(seeds) => {
                // Test-only names from the controller's own naming scheme; no user input.
                seeds.create(name, content).map_err(|reason| {
                    benchcluster_controller::hypervisor::HypervisorError::UploadStalled {
                        volume: format!("{name}: {reason}"),
                    }
                })
            }
        }
    }

    async fn delete_volume(&self, name: &str) -> benchcluster_controller::hypervisor::Result<()> {
        self.removal("delete volume (injected failure)")?;
        self.mutated().await;
        self.inner.delete_volume(name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FakeHypervisor;

    #[tokio::test]
    async fn reads_and_mutations_are_counted_apart()
    -> benchcluster_controller::hypervisor::Result<()> {
        let hv = Instrumented::new(FakeHypervisor::new("net", &[]));
        hv.inventory(&["net".to_owned()]).await?;
        hv.domain_owner("lab-x-cp-0").await?;
        hv.delete_volume("lab-x-cp-0.qcow2").await?;
        assert_eq!(hv.reads.load(Ordering::Relaxed), 2);
        assert_eq!(hv.inventory_reads.load(Ordering::Relaxed), 1);
        assert_eq!(hv.mutations.load(Ordering::Relaxed), 1);
        Ok(())
    }
}
