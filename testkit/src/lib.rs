//! Test doubles for benchcluster, shared by the controller's own tests and the e2e
//! harness (a dev-dependency only; the controller never links it):
//!
//! - [`FakeHypervisor`]: an in-memory libvirt host with injectable failures and hangs;
//! - [`Instrumented`]: wraps any hypervisor (libvirt's `test:///default` in the api
//!   tier) to count mutations, freeze a pass, fail removals, model latency;
//! - [`FakeGuest`]: in-memory VMs and the kubeadm cluster they form;
//! - [`FakeApi`]: an in-memory Kubernetes API behind a real `kube::Client`.

pub mod api;
pub mod guest;
pub mod hypervisor;
pub mod instrumented;

pub use api::FakeApi;
pub use guest::{Completed, FakeGuest, SECRET_MARKER, UNKNOWN_PLUGIN};
/// HTTP methods, for [`FakeApi::fail`] and [`FakeApi::count`].
pub use http::Method;
pub use hypervisor::{Call, FakeHypervisor};
pub use instrumented::{Instrumented, RecordedSeeds};
