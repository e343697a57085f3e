//! benchcluster controller: reconciles `BenchCluster` resources into libvirt VMs that
//! form kubeadm clusters.
//!
//! [`reconcile`] holds the pass: observe reads the hypervisor and the guest cluster into
//! a world; plan is a pure function from spec and world to actions; act executes them
//! through the two edges, [`hypervisor`] (libvirt) and [`guest`] (SSH, kubeadm, the guest
//! cluster's API); status derives what is written back. The rest is operating the
//! controller ([`http`], [`leader`], [`metrics`], [`telemetry`]) and small shared parts
//! ([`names`], [`seed`], [`error`], [`util`]).

pub mod error;
pub mod guest;
pub mod http;
pub mod hypervisor;
pub mod leader;
pub mod metrics;
pub mod names;
pub mod reconcile;
pub mod seed;
pub mod telemetry;
pub mod util;

pub use error::{Error, Result};

/// Field manager of every write this controller makes, to its own API server and to the
/// guest clusters' (also its Events' reporter and its Secrets' managed-by label).
pub const FIELD_MANAGER: &str = "benchcluster-controller";
pub use reconcile::{Context, Settings};
