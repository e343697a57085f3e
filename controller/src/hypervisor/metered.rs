//! [`Metered`]: a [`Hypervisor`] wrapper that reports each call, reads included, with
//! its kind, before it reaches the wrapped hypervisor.
//!
//! It knows no metrics registry: whoever builds it passes the recorder (the binary
//! passes `Metrics::libvirt_call`, behind `benchcluster_libvirt_calls_total` and
//! `benchcluster_libvirt_mutations_total`). A dependency on the metrics module would
//! close an import cycle, since the metrics module labels the controller's errors, and
//! those include [`HypervisorError`].
//!
//! [`HypervisorError`]: super::HypervisorError

use std::sync::Arc;

use super::{DomainOwner, DomainSpec, Hypervisor, Inventory, OverlaySpec, Result};

/// Whether a call reads the host or changes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CallKind {
    Read,
    Mutation,
}

/// Called with the operation's name (`inventory`, `define_domain`, ...) and kind for
/// each call.
type Recorder = Arc<dyn Fn(&'static str, CallKind) + Send + Sync>;

/// A [`Hypervisor`] that reports the calls reaching the inner one.
pub struct Metered<H> {
    pub inner: H,
    record: Recorder,
}

impl<H> Metered<H> {
    /// Wraps `inner`; `record` is called with the operation and kind of every call.
    pub fn new(inner: H, record: impl Fn(&'static str, CallKind) + Send + Sync + 'static) -> Self {
        Self {
            inner,
            record: Arc::new(record),
        }
    }

    fn read(&self, operation: &'static str) {
        (self.record)(operation, CallKind::Read);
    }

    fn mutation(&self, operation: &'static str) {
        (self.record)(operation, CallKind::Mutation);
    }
}

impl<H: Hypervisor> Hypervisor for Metered<H> {
    async fn inventory(&self, networks: &[String]) -> Result<Inventory> {
        self.read("inventory");
        self.inner.inventory(networks).await
    }

    async fn domain_owner(&self, name: &str) -> Result<DomainOwner> {
        self.read("domain_owner");
        self.inner.domain_owner(name).await
    }

    async fn create_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        self.mutation("create_overlay");
        self.inner.create_overlay(spec).await
    }

    async fn define_domain(&self, spec: &DomainSpec) -> Result<()> {
        self.mutation("define_domain");
        self.inner.define_domain(spec).await
    }

    async fn start_domain(&self, name: &str) -> Result<()> {
        self.mutation("start_domain");
        self.inner.start_domain(name).await
    }

    async fn remove_domain(&self, name: &str) -> Result<()> {
        self.mutation("remove_domain");
        self.inner.remove_domain(name).await
    }

    async fn create_seed(&self, name: &str, content: &[u8]) -> Result<()> {
        self.mutation("create_seed");
        self.inner.create_seed(name, content).await
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        self.mutation("delete_volume");
        self.inner.delete_volume(name).await
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use parking_lot::Mutex;

    use super::*;
    use crate::hypervisor::libvirt::{Libvirt, LibvirtConfig};

    type TestResult = std::result::Result<(), Box<dyn Error>>;

    #[tokio::test]
    async fn counts_every_call_with_its_kind() -> TestResult {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let hv = Metered::new(
            Libvirt::new(LibvirtConfig::for_uri("test:///default")),
            move |operation, kind| log.lock().push((operation, kind)),
        );
        hv.inventory(&["default".to_owned()]).await?;
        hv.domain_owner("mtr-absent-w-0").await?;
        // Both succeed on what does not exist, so nothing is left behind.
        hv.remove_domain("mtr-absent-w-0").await?;
        hv.delete_volume("mtr-absent.qcow2").await?;
        assert_eq!(
            *seen.lock(),
            [
                ("inventory", CallKind::Read),
                ("domain_owner", CallKind::Read),
                ("remove_domain", CallKind::Mutation),
                ("delete_volume", CallKind::Mutation),
            ]
        );
        Ok(())
    }
}
