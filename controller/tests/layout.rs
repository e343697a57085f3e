//! The dependency rules of DESIGN.md, checked on the source: what each part of
//! `controller/src` may import (from its `crate::`/`super::` paths, followed from module
//! to module, and client types), and that no import cycle forms between top-level
//! modules.

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

/// The edges: no pure module reaches them.
const EDGES: [&str; 2] = ["guest", "hypervisor"];

/// Clients, clocks and randomness: what a pure module does not use, so its result
/// depends on its input only.
const CLIENTS_AND_CLOCKS: [&str; 11] = [
    "kube::",
    "tokio",
    "virt::",
    "openssh",
    "hyper::",
    "axum::",
    "Instant::now",
    "SystemTime::now",
    "rand::",
    "rand_core",
    "fastrand",
];

/// The module path of a file under `src/`: `reconcile/plan.rs` is `reconcile::plan`,
/// `guest/mod.rs` is `guest`, `lib.rs` the crate root.
fn module_path(file: &Path) -> Vec<String> {
    let relative = file.strip_prefix(src()).unwrap().with_extension("");
    let mut path: Vec<String> = relative
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if path
        .last()
        .is_some_and(|last| last == "mod" || last == "lib")
    {
        path.pop();
    }
    path
}

/// The file of a module, if it has one.
fn module_file(path: &[String]) -> Option<PathBuf> {
    if path.is_empty() {
        return Some(src().join("lib.rs"));
    }
    let dir = src().join(path.join("/"));
    [dir.with_extension("rs"), dir.join("mod.rs")]
        .into_iter()
        .find(|f| f.is_file())
}

/// The paths a (possibly grouped) path names, as segments: `a::{self, b::{c, d as e}}`
/// names `a`, `a::b::c` and `a::b::d`.
fn expand(path: &str) -> Vec<Vec<String>> {
    let Some(open) = path.find('{') else {
        let path = path.split_whitespace().next().unwrap_or_default();
        let mut segments: Vec<String> = path
            .split("::")
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect();
        if segments.len() > 1 && segments.last().is_some_and(|s| s == "self" || s == "*") {
            segments.pop();
        }
        return vec![segments];
    };
    let (prefix, inner) = (&path[..open], &path[open + 1..path.rfind('}').unwrap()]);
    let mut parts = Vec::new();
    let (mut depth, mut from) = (0, 0);
    for (i, c) in inner.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&inner[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&inner[from..]);
    parts
        .into_iter()
        .filter(|p| !p.trim().is_empty())
        .flat_map(|p| expand(&format!("{prefix}{}", p.trim())))
        .collect()
}

/// The file of the deepest module a path from module `from` goes through (where what it
/// names is defined or re-exported). A path not starting with `crate`, `super` or
/// `self` is a child module's, or another crate's (`None`).
fn resolve(from: &[String], segments: &[String]) -> Option<PathBuf> {
    let (mut base, mut rest) = (from.to_vec(), segments);
    let relative_to_child = match rest.first().map(String::as_str) {
        Some("crate") => {
            base.clear();
            rest = &rest[1..];
            false
        }
        Some("self") => {
            rest = &rest[1..];
            false
        }
        Some("super") => {
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            false
        }
        _ => true,
    };
    (usize::from(relative_to_child)..=rest.len())
        .rev()
        .find_map(|n| module_file(&[base.as_slice(), &rest[..n]].concat()))
}

/// The files of the modules `code` (the code of `file`) imports: every path starting
/// with `crate::`, `super::` or `self::`, and every `use` of a child module.
fn imported_modules(file: &Path, code: &str) -> BTreeSet<PathBuf> {
    let from = module_path(file);
    let chars: Vec<char> = code.chars().collect();
    let in_path = |c: char| c.is_alphanumeric() || c == '_' || c == ':';
    let mut modules = BTreeSet::new();
    let (mut i, mut after_use) = (0, false);
    while i < chars.len() {
        let starts =
            (chars[i].is_alphabetic() || chars[i] == '_') && (i == 0 || !in_path(chars[i - 1]));
        if !starts {
            i += 1;
            continue;
        }
        // The path, with its `{...}` group if any.
        let mut end = i;
        let mut depth = 0;
        while end < chars.len() && (in_path(chars[end]) || chars[end] == '{' || depth > 0) {
            match chars[end] {
                '{' => depth += 1,
                '}' => depth -= 1,
                _ => {}
            }
            end += 1;
        }
        let path: String = chars[i..end].iter().collect();
        let first = path.split("::").next().unwrap();
        if path.contains("::") && (after_use || ["crate", "super", "self"].contains(&first)) {
            modules.extend(expand(&path).iter().filter_map(|s| resolve(&from, s)));
        }
        after_use = path == "use";
        i = end;
    }
    modules
}

/// What `root` reaches through its imports, module to module, that is an edge or uses
/// a client or a clock, each with the chain that reaches it. The walk does not enter
/// `stops`.
fn impurities(root: &str, stops: &[&str]) -> Vec<String> {
    let code: BTreeMap<PathBuf, String> = sources(&src()).into_iter().collect();
    let name = |file: &Path| file.strip_prefix(src()).unwrap().display().to_string();
    let mut chains = BTreeMap::from([(src().join(root), root.to_owned())]);
    let mut todo = vec![src().join(root)];
    let mut bad = Vec::new();
    while let Some(file) = todo.pop() {
        let chain = chains[&file].clone();
        if EDGES
            .iter()
            .any(|edge| name(&file).starts_with(&format!("{edge}/")))
        {
            bad.push(format!("{chain}: an edge"));
            continue;
        }
        let used: Vec<_> = CLIENTS_AND_CLOCKS
            .iter()
            .filter(|n| code[&file].contains(*n))
            .collect();
        if !used.is_empty() {
            bad.push(format!("{chain} uses {used:?}"));
            continue;
        }
        for next in imported_modules(&file, &code[&file]) {
            if !stops.contains(&name(&next).as_str()) && !chains.contains_key(&next) {
                chains.insert(next.clone(), format!("{chain} -> {}", name(&next)));
                todo.push(next);
            }
        }
    }
    bad
}

#[test]
fn the_planner_and_the_world_reach_no_edge_no_client_no_clock() {
    let bad: Vec<String> = ["reconcile/plan.rs", "reconcile/world.rs"]
        .iter()
        .flat_map(|root| impurities(root, &[]))
        .collect();
    assert!(bad.is_empty(), "{bad:#?}");
}

/// Where status meets the rest of the pass, and the walk stops: what the act stage did
/// (its outcome, edge errors among it, and the timelines) and the settings, which live
/// in the context beside its clients. All else status reads, the pools above all, is pure.
const WHERE_STATUS_MEETS_THE_PASS: [&str; 3] = [
    "reconcile/outcome.rs",
    "reconcile/timeline.rs",
    "reconcile/context.rs",
];

#[test]
fn what_status_reads_beside_the_act_stage_is_pure() {
    let bad = impurities("reconcile/status.rs", &WHERE_STATUS_MEETS_THE_PASS);
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
