//! The controller's one error type.

use benchcluster_crd::quantity::QuantityError;

use crate::guest::GuestError;
use crate::hypervisor::HypervisorError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("BenchCluster has no {0}")]
    MissingMetadata(&'static str),
    #[error("Kubernetes API: {context}")]
    Kube {
        context: &'static str,
        #[source]
        source: kube::Error,
    },
    #[error("hypervisor")]
    Hypervisor(#[from] HypervisorError),
    #[error("guest")]
    Guest(#[from] GuestError),
    #[error("identity seed")]
    Seed(#[from] crate::seed::SeedError),
    #[error("{field} is not a byte quantity")]
    Quantity {
        field: &'static str,
        #[source]
        source: QuantityError,
    },
    #[error("SSH key Secret {name:?}: {problem}")]
    SshKeySecret { name: String, problem: &'static str },
    #[error("cannot {action} before {requirement}")]
    NotReady {
        action: &'static str,
        requirement: &'static str,
    },
    /// A background guest operation ended without a result (its task panicked).
    #[error("{operation} ended without a result")]
    OperationLost { operation: &'static str },
    #[error("{failed} step(s) failed, first {step}")]
    Steps {
        failed: usize,
        step: String,
        #[source]
        first: Box<Error>,
    },
    /// The guest cluster was initialised but its API does not answer: waited for with
    /// backoff, never treated as uninitialised.
    #[error("guest cluster API unreachable since {since}: {reason}")]
    GuestApiSilent { since: String, reason: String },
    #[error("cleanup left {remaining} node(s) behind")]
    CleanupIncomplete { remaining: usize },
    #[error("finalizer")]
    Finalizer(#[source] Box<kube::runtime::finalizer::Error<Error>>),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn kube(context: &'static str) -> impl FnOnce(kube::Error) -> Error {
        move |source| Error::Kube { context, source }
    }

    /// A low-cardinality label for metrics and event reasons.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::MissingMetadata(_) => "metadata",
            Error::Kube { .. } => "kube",
            Error::Hypervisor(_) => "hypervisor",
            Error::Guest(_) => "guest",
            Error::Seed(_) => "seed",
            Error::Quantity { .. } => "spec",
            Error::SshKeySecret { .. } => "ssh_key_secret",
            Error::NotReady { .. } => "not_ready",
            Error::OperationLost { .. } => "operation_lost",
            Error::Steps { first, .. } => first.metric_label(),
            Error::GuestApiSilent { .. } => "guest_api",
            Error::CleanupIncomplete { .. } => "cleanup",
            Error::Finalizer(inner) => match inner.as_ref() {
                kube::runtime::finalizer::Error::ApplyFailed(e)
                | kube::runtime::finalizer::Error::CleanupFailed(e) => e.metric_label(),
                _ => "finalizer",
            },
        }
    }

    /// The reason a condition shows for a permanent error (see [`Error::is_permanent`]):
    /// what the user has to fix, in the edge's terms; `Failed` for any other.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::SshKeySecret { .. } => "SshKeySecretInvalid",
            // `root`: a shared inventory read's error names the same cause.
            Error::Hypervisor(e) => match e.root() {
                HypervisorError::ImageMissing { .. } => "ImageNotFound",
                HypervisorError::PoolMissing { .. } => "PoolNotFound",
                HypervisorError::NameConflict { .. } => "NameConflict",
                _ => "Failed",
            },
            Error::Guest(GuestError::HostKeyMismatch { .. }) => "HostKeyMismatch",
            Error::Steps { first, .. } => first.reason(),
            _ => "Failed",
        }
    }

    /// Errors that retrying cannot fix until the user or the host changes something.
    pub fn is_permanent(&self) -> bool {
        match self {
            Error::Hypervisor(e) => e.is_permanent(),
            Error::Guest(GuestError::HostKeyMismatch { .. }) => true,
            Error::Quantity { .. } | Error::SshKeySecret { .. } => true,
            Error::Seed(crate::seed::SeedError::Unrepresentable { .. }) => true,
            Error::Steps { first, .. } => first.is_permanent(),
            _ => false,
        }
    }

    /// The error and its causes, one line, for conditions and Warning events. Sources
    /// never carry secrets: guest output is trimmed and redacted before it becomes one.
    pub fn chain(&self) -> String {
        crate::util::chain(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_shared_read_failure_keeps_the_reason_and_permanence_of_its_cause() {
        let missing = HypervisorError::PoolMissing {
            pool: "nodes".into(),
        };
        let shared = Error::Hypervisor(HypervisorError::Shared(std::sync::Arc::new(missing)));
        assert_eq!(shared.reason(), "PoolNotFound");
        assert!(shared.is_permanent());
        assert_eq!(
            shared.chain(),
            "hypervisor: the shared host inventory read failed: storage pool \"nodes\" does not exist"
        );
    }

    #[test]
    fn a_cause_already_in_its_errors_message_is_not_repeated() {
        let silent = Error::GuestApiSilent {
            since: "2026-12-01T19:01:37Z".into(),
            reason: "connection refused".into(),
        };
        let wrapped = Error::Finalizer(Box::new(kube::runtime::finalizer::Error::ApplyFailed(
            silent,
        )));
        assert_eq!(
            wrapped.chain(),
            "finalizer: failed to apply object: guest cluster API unreachable since \
             2026-12-01T19:01:37Z: connection refused"
        );
        let steps = Error::Steps {
            failed: 1,
            step: "JoinWorker".into(),
            first: Box::new(Error::Guest(GuestError::Busy { node: "w-0".into() })),
        };
        assert_eq!(
            steps.chain(),
            "1 step(s) failed, first JoinWorker: guest: an earlier kubeadm still runs on w-0; \
             waiting for it to end"
        );
    }
}
