//! The libvirt connection: opened lazily, shared by every call, dropped when a call
//! fails at the connection level (or finds it dead) so the next call opens a new one;
//! every call runs on tokio's blocking pool because `virt` calls block.
//!
//! `virt` 0.5's `Connect` has no `close()`: its `Drop` calls `virConnectClose`, so
//! dropping the last clone is what closes the connection.

use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use virt::connect::Connect;
use virt::error::{Error as VirtError, ErrorDomain, ErrorNumber};

use super::inventory::DomainCache;
use super::{Libvirt, LibvirtConfig, libvirt};
use crate::hypervisor::{HypervisorError, Result};

/// Calls in flight at once. libvirt serialises most of them per connection anyway;
/// the bound keeps a thousand reconciles from parking a thousand blocking threads.
const MAX_CONCURRENT_CALLS: usize = 8;

/// What every clone of a [`Libvirt`] shares.
pub(super) struct Shared {
    pub(super) config: LibvirtConfig,
    calls: tokio::sync::Semaphore,
    slot: Mutex<Slot>,
    /// What the inventory read learnt of each domain (see `inventory`).
    pub(super) domains: Mutex<DomainCache>,
}

/// The cached connection. `generation` counts connections opened, so a call that saw
/// its connection fail drops that one and never a newer one opened meanwhile.
#[derive(Default)]
struct Slot {
    connection: Option<Connect>,
    generation: u64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Slot> {
        self.slot.lock()
    }

    /// The shared connection (a new reference to it) and its generation, opening one
    /// if there is none or the cached one is dead.
    fn connection(&self) -> Result<(Connect, u64)> {
        let mut slot = self.lock();
        if let Some(connection) = &slot.connection {
            if matches!(connection.is_alive(), Ok(true)) {
                return Ok((connection.clone(), slot.generation));
            }
            let dead = slot.connection.take();
            drop(dead);
        }
        // libvirt's default handler prints every error, expected ones included, to
        // stderr; errors reach us as values anyway.
        virt::error::clear_error_callback();
        // Opening under the lock: concurrent callers wait for this one connection
        // rather than each opening their own.
        let connection =
            Connect::open(Some(&self.config.uri)).map_err(|source| HypervisorError::Connect {
                uri: self.config.uri.clone(),
                source,
            })?;
        slot.generation += 1;
        slot.connection = Some(connection.clone());
        Ok((connection, slot.generation))
    }

    /// Drops the cached connection if it is still the one of `generation`.
    fn forget(&self, generation: u64) {
        let stale = {
            let mut slot = self.lock();
            if slot.generation == generation {
                slot.connection.take()
            } else {
                None
            }
        };
        // Closed outside the lock: closing a remote connection is a round trip.
        drop(stale);
    }
}

impl Libvirt {
    /// A hypervisor for `config`; nothing is opened until the first call.
    pub fn new(config: LibvirtConfig) -> Self {
        Self {
            shared: Arc::new(Shared {
                config,
                calls: tokio::sync::Semaphore::new(MAX_CONCURRENT_CALLS),
                slot: Mutex::new(Slot::default()),
                domains: Mutex::new(DomainCache::default()),
            }),
        }
    }

    pub fn config(&self) -> &LibvirtConfig {
        &self.shared.config
    }

    /// Opens the connection if needed and makes one round trip on it (readiness).
    pub async fn check_connection(&self) -> Result<()> {
        self.run(|conn, _| {
            conn.lib_version()
                .map(drop)
                .map_err(libvirt("get library version"))
        })
        .await
    }

    /// Closes the connection now (for a clean shutdown); a later call reopens one.
    pub async fn disconnect(&self) -> Result<()> {
        let shared = Arc::clone(&self.shared);
        tokio::task::spawn_blocking(move || {
            let connection = shared.lock().connection.take();
            drop(connection);
        })
        .await?;
        Ok(())
    }

    /// Runs `f` with the connection on the blocking pool, dropping the connection
    /// when `f` fails at the connection level.
    pub(super) async fn run<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connect, &LibvirtConfig) -> Result<T> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.shared.calls.acquire().await.ok();
        tokio::task::spawn_blocking(move || {
            let (connection, generation) = shared.connection()?;
            let result = f(&connection, &shared.config);
            if let Err(HypervisorError::Libvirt { source, .. }) = &result
                && is_connection_error(source)
            {
                shared.forget(generation);
            }
            result
        })
        .await?
    }
}

/// Whether an error means the connection itself is unusable.
fn is_connection_error(error: &VirtError) -> bool {
    let transport = matches!(
        error.domain().known(),
        Some(ErrorDomain::Rpc | ErrorDomain::Remote | ErrorDomain::Ssh | ErrorDomain::Libssh)
    );
    match error.code().known() {
        Some(
            ErrorNumber::NoConnect
            | ErrorNumber::InvalidConn
            | ErrorNumber::SystemError
            | ErrorNumber::Rpc
            | ErrorNumber::Ssh
            | ErrorNumber::Libssh,
        ) => true,
        Some(ErrorNumber::InternalError) => transport,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hypervisor::libvirt::test_support::{TestResult, hypervisor};

    #[tokio::test]
    async fn check_connection_works_and_reports_bad_uris() -> TestResult {
        hypervisor().check_connection().await?;
        let bad = Libvirt::new(LibvirtConfig::for_uri(
            "test:///nonexistent/benchcluster.xml",
        ));
        assert!(matches!(
            bad.check_connection().await,
            Err(HypervisorError::Connect { .. })
        ));
        Ok(())
    }

    #[tokio::test]
    async fn forgetting_a_connection_reopens_only_that_one() -> TestResult {
        let hv = hypervisor();
        hv.check_connection().await?;
        let shared = Arc::clone(&hv.shared);
        let (first, second, third) = tokio::task::spawn_blocking(move || {
            let (_, first) = shared.connection()?;
            shared.forget(first);
            let (_, second) = shared.connection()?;
            // A stale generation leaves the newer connection alone.
            shared.forget(first);
            let (_, third) = shared.connection()?;
            Ok::<_, HypervisorError>((first, second, third))
        })
        .await??;
        assert!(second > first);
        assert_eq!(third, second);
        hv.disconnect().await?;
        hv.check_connection().await?;
        Ok(())
    }
}
