//! A namespace per test, so tests sharing one server cannot see each other's objects.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::Context as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, ObjectMeta, PostParams};

/// Label on every namespace the harness creates (value: the prefix), to find them.
pub const NAMESPACE_LABEL: &str = "benchcluster.dev/e2e";

/// Creates `<prefix>-<8 random hex digits>` labelled [`NAMESPACE_LABEL`]`=<prefix>`
/// and returns its name. `prefix` must be a DNS label of at most 54 characters.
///
/// There is no namespace controller on the test server, so a deleted namespace would
/// stay Terminating: tests leave theirs, and the server goes with the test binary.
pub async fn create_namespace(client: &kube::Client, prefix: &str) -> anyhow::Result<String> {
    let name = format!("{prefix}-{}", random_suffix());
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(BTreeMap::from([(
                NAMESPACE_LABEL.to_owned(),
                prefix.to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &namespace)
        .await
        .with_context(|| format!("creating namespace {name}"))?;
    Ok(name)
}

/// Eight lowercase hex digits, different on every call.
pub fn random_suffix() -> String {
    static CALLS: AtomicU64 = AtomicU64::new(0);
    // RandomState is seeded from the OS; hashing a counter through it gives distinct,
    // unpredictable values without a dependency on a random-number crate.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    format!("{:08x}", hasher.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suffixes_are_short_hex_and_differ() {
        let a = random_suffix();
        let b = random_suffix();
        assert_eq!(a.len(), 8);
        assert!(
            a.chars()
                .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
        );
        assert_ne!(a, b);
    }
}
