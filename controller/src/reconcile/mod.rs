//! The reconciler: one pass per BenchCluster, four stages in order.
//!
//! - [`observe`] reads the hypervisor and the guest cluster into a [`World`] (and records
//!   nothing: what it saw of the nodes' progress travels back as [`Stamp`]s);
//! - [`plan`] is a pure function from spec and world to [`Action`]s;
//! - [`act`] runs them through the hypervisor and guest edges, long guest steps as
//!   background [`operations`], and says what happened in an [`Outcome`];
//! - [`status`] derives the status written back (only when it changed).
//!
//! [`driver`] wires them: the finalizer, `apply` (the four stages), `cleanup`, and the
//! controller's run loop. The pass types the stages share are plain values: [`world`]
//! (what is), [`outcome`] (what a pass did), [`timeline`] (when each node got how far;
//! its recorder is the one place phase timings are written). [`guest_watch`] wakes a
//! cluster when one of its guest Nodes changes.

pub mod act;
pub mod context;
pub mod driver;
pub mod guest_watch;
pub mod inventory;
pub mod observe;
pub mod operations;
pub mod outcome;
pub mod plan;
pub mod pools;
pub mod scheduler;
pub mod secret_index;
pub mod status;
pub mod timeline;
pub mod world;

pub use context::{Context, Settings};
pub use driver::{error_policy, reconcile, run};
pub use outcome::Outcome;
pub use plan::Action;
pub use timeline::{Stamp, Timeline};
pub use world::World;
