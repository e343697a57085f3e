//! Test harness for benchcluster: brings up real components on loopback and gives
//! tests clients for them.
//!
//! - [`TestApiServer`]: kube-apiserver + etcd built from the versions pinned in
//!   `e2e/versions.env`, a cluster-admin kubeconfig, `kubectl`, the CRD installer.
//! - [`wait::until`]: the only way to wait (poll with a deadline, never a fixed sleep).
//! - [`create_namespace`]: a random labelled namespace per test.
//! - [`logs::LogCapture`]: what the controller logged, for checks afterwards.
//! - [`measure`]: counting what the controller does (metrics of the controller and of
//!   the API server, the statuses a watch saw, a process's memory and CPU), for the
//!   scale bench and the api tier's write tests.
//! - [`sandbox::Sandbox`]: libvirtd, its network and pools in a network namespace of
//!   its own, for the vm and e2e tiers and `cargo xtask up`.

pub mod apiserver;
pub mod keys;
pub mod logs;
pub mod measure;
pub mod namespace;
mod pki;
mod process;
pub mod sandbox;
pub mod testbed;
pub mod wait;

pub use apiserver::TestApiServer;
pub use namespace::create_namespace;
