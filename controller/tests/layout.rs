//! The dependency rules of DESIGN.md, checked on the source: what each part of
//! `controller/src` may import (from its `use crate::`/`super::` paths and client
//! types), and that no import cycle forms between top-level modules.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Every `.rs` file under `dir`, with its text up to its unit tests (test code may
/// use anything).
fn sources(dir: &Path) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let text = std::fs::read_to_string(&path).unwrap();
                let code = text.split("#[cfg(test)]").next().unwrap_or_default();
                // Doc and line comments may name anything.
                let code: String = code
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("//"))
                    .collect::<Vec<_>>()
                    .join("\n");
                out.push((path, code));
            }
        }
    }
    out.sort();
    out
}

fn offending(files: &[(PathBuf, String)], needles: &[&str]) -> Vec<String> {
    files
        .iter()
        .flat_map(|(path, code)| {
            needles
                .iter()
                .filter(|n| code.contains(*n))
                .map(move |n| format!("{} uses {n}", path.display()))
        })
        .collect()
}

#[test]
fn the_planner_and_the_world_use_no_edge_no_client_no_clock() {
    let reconcile = src().join("reconcile");
    let files: Vec<_> = ["plan.rs", "world.rs"]
        .iter()
        .map(|f| {
            let path = reconcile.join(f);
            let text = std::fs::read_to_string(&path).unwrap();
            let code = text.split("#[cfg(test)]").next().unwrap().to_owned();
            (path, code)
        })
        .collect();
    let bad = offending(
        &files,
        &[
            "crate::hypervisor",
            "crate::guest",
            "super::context",
            "super::act",
            "kube::",
            "tokio",
            "Instant::now",
            "SystemTime::now",
            "rand::",
            "rand_core",
        ],
    );
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn the_hypervisor_and_the_guest_do_not_know_each_other() {
    let hypervisor = sources(&src().join("hypervisor"));
    let guest = sources(&src().join("guest"));
    let mut bad = offending(&hypervisor, &["crate::guest", "crate::reconcile"]);
    bad.extend(offending(
        &guest,
        &["crate::hypervisor", "crate::reconcile"],
    ));
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn observe_records_nothing_and_status_knows_no_edge_error() {
    let reconcile = src().join("reconcile");
    let read = |f: &str| {
        let path = reconcile.join(f);
        let text = std::fs::read_to_string(&path).unwrap();
        vec![(path, text.split("#[cfg(test)]").next().unwrap().to_owned())]
    };
    let mut bad = offending(
        &read("observe.rs"),
        &["ctx.record", "ctx.metrics", ".metrics.", "Timeline::"],
    );
    bad.extend(offending(
        &read("status.rs"),
        &[
            "HypervisorError",
            "GuestError",
            "crate::hypervisor",
            "crate::guest",
        ],
    ));
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn the_util_module_imports_nothing_of_ours() {
    let path = src().join("util.rs");
    let text = std::fs::read_to_string(&path).unwrap();
    let files = vec![(path, text)];
    let bad = offending(&files, &["crate::", "super::"]);
    assert!(bad.is_empty(), "{bad:#?}");
}

#[test]
fn test_doubles_and_the_harness_are_never_a_dependency_of_the_controller() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml")).unwrap();
    let dependencies = manifest
        .split("[dependencies]")
        .nth(1)
        .and_then(|rest| rest.split("\n[").next())
        .unwrap();
    for forbidden in ["benchcluster-testkit", "benchcluster-e2e"] {
        assert!(
            !dependencies.contains(forbidden),
            "{forbidden} in [dependencies]"
        );
    }
    let crd =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../crd/Cargo.toml"))
            .unwrap();
    let crd_dependencies = crd.split("[dependencies]").nth(1).unwrap_or_default();
    assert!(
        !crd_dependencies.contains("benchcluster-"),
        "crd/ depends on nothing of ours"
    );
}

#[test]
fn no_import_cycle_between_top_level_modules() {
    // Module -> the top-level modules its code names through `crate::`.
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, code) in sources(&src()) {
        let relative = path.strip_prefix(src()).unwrap();
        let top = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_owned();
        if top == "lib" || top == "main" {
            continue;
        }
        let deps = graph.entry(top.clone()).or_default();
        for (at, _) in code.match_indices("crate::") {
            let name: String = code[at + "crate::".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if name != top && !name.is_empty() {
                deps.insert(name);
            }
        }
    }
    let modules: BTreeSet<String> = graph.keys().cloned().collect();
    // A cycle exists iff some module reaches itself.
    for start in &modules {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<&String> = graph[start]
            .iter()
            .filter(|m| modules.contains(*m))
            .collect();
        while let Some(module) = stack.pop() {
            assert!(
                module != start,
                "{start} is part of an import cycle: {graph:#?}"
            );
            if seen.insert(module.clone()) {
                stack.extend(graph[module].iter().filter(|m| modules.contains(*m)));
            }
        }
    }
}
