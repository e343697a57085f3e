//! benchcluster controller: reconciles `BenchCluster` resources into libvirt VMs that
//! form kubeadm clusters.
//!
//! A pass is four stages: [`observe`] reads the hypervisor and the guest cluster into a
//! [`world::World`]; [`plan`] is a pure function from spec and world to actions; [`act`]
//! executes them through the [`hypervisor`] and [`guest`] edges; [`status`] derives the
//! status written back (only when it changed).

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
pub use reconcile::{Context, Settings};
