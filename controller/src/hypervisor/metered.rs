//! [`Metered`]: a [`Hypervisor`] wrapper that reports each mutating call before it
//! reaches the wrapped hypervisor (reads pass through uncounted).
//!
//! It knows no metrics registry: whoever builds it passes the recorder (the binary
//! passes `Metrics::libvirt_mutation`, behind `benchcluster_libvirt_mutations_total`).
//! A dependency on the metrics module would close an import cycle, since the metrics
//! module labels the controller's errors, and those include [`HypervisorError`].
//!
//! [`HypervisorError`]: super::HypervisorError

use std::sync::Arc;

use super::{DomainOwner, DomainSpec, Hypervisor, Inventory, OverlaySpec, Result};

/// Called with the operation's name (`define_domain`, ...) for each mutating call.
type Recorder = Arc<dyn Fn(&'static str) + Send + Sync>;

/// A [`Hypervisor`] that reports the mutating calls reaching the inner one.
pub struct Metered<H> {
    pub inner: H,
    record: Recorder,
}

impl<H> Metered<H> {
    /// Wraps `inner`; `record` is called with the operation of every mutating call.
    pub fn new(inner: H, record: impl Fn(&'static str) + Send + Sync + 'static) -> Self {
        Self {
            inner,
            record: Arc::new(record),
        }
    }
}

impl<H: Hypervisor> Hypervisor for Metered<H> {
    async fn inventory(&self, networks: &[String]) -> Result<Inventory> {
        self.inner.inventory(networks).await
    }

    async fn domain_owner(&self, name: &str) -> Result<DomainOwner> {
        self.inner.domain_owner(name).await
    }

    async fn create_overlay(&self, spec: &OverlaySpec) -> Result<()> {
        (self.record)("create_overlay");
        self.inner.create_overlay(spec).await
    }

    async fn define_domain(&self, spec: &DomainSpec) -> Result<()> {
        (self.record)("define_domain");
        self.inner.define_domain(spec).await
    }

    async fn start_domain(&self, name: &str) -> Result<()> {
        (self.record)("start_domain");
        self.inner.start_domain(name).await
    }

    async fn remove_domain(&self, name: &str) -> Result<()> {
        (self.record)("remove_domain");
        self.inner.remove_domain(name).await
    }

    async fn create_seed(&self, name: &str, content: &[u8]) -> Result<()> {
        (self.record)("create_seed");
        self.inner.create_seed(name, content).await
    }

    async fn delete_volume(&self, name: &str) -> Result<()> {
        (self.record)("delete_volume");
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
    async fn counts_mutations_and_not_reads() -> TestResult {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = Arc::clone(&seen);
        let hv = Metered::new(
            Libvirt::new(LibvirtConfig::for_uri("test:///default")),
            move |operation| log.lock().push(operation),
        );
        hv.inventory(&["default".to_owned()]).await?;
        hv.domain_owner("mtr-absent-w-0").await?;
        assert!(seen.lock().is_empty(), "reads counted: {:?}", seen.lock());

        // Both succeed on what does not exist, so nothing is left behind.
        hv.remove_domain("mtr-absent-w-0").await?;
        hv.delete_volume("mtr-absent.qcow2").await?;
        assert_eq!(*seen.lock(), ["remove_domain", "delete_volume"]);
        Ok(())
    }
}
