//! The transport's walls, held by reading its sources: no path into a table, the producer, the
//! consumer, ops or metrics, and the configuration read only in `select.rs`.
//!
//! A path is followed from `crate::` and from a chain of `super::` that climbs to the crate
//! root, including the braces of a grouped `use`; comments and docs are read too, so that a doc
//! link does not reach across either.

use std::path::{Path, PathBuf};

/// The crate's top-level modules the transport never names.
const WALLED_OFF: &[&str] = &[
    "consumer",
    "producer",
    "ops",
    "metrics",
    "published",
    "received",
    "tables",
];

/// The one file that reads the configuration.
const READS_CONFIG: &str = "select.rs";

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, found: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("the transport sources are readable");
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            sources(&path, found);
        } else if path.extension().is_some_and(|ext| ext == "rs") {
            found.push(path);
        }
    }
}

/// How deep below the crate root the module of `path` is (`transport/mod.rs`: 1,
/// `transport/stomp/driver.rs`: 3).
fn depth(root: &Path, path: &Path) -> usize {
    let relative = path.strip_prefix(root).expect("under the sources");
    let mut depth = relative.components().count();
    if relative.file_name().is_some_and(|name| name == "mod.rs") {
        depth -= 1;
    }
    depth
}

/// The identifier at the start of `text`.
fn identifier(text: &str) -> &str {
    let end = text
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(text.len());
    &text[..end]
}

/// The top-level modules named right after the crate root in `rest`: one identifier, or each
/// item of a `{...}` group.
fn named_at_root(rest: &str, names: &mut Vec<String>) {
    if let Some(group) = rest.strip_prefix('{') {
        let mut level = 0usize;
        let mut item_start = true;
        for (index, c) in group.char_indices() {
            match c {
                '{' => level += 1,
                '}' if level == 0 => return,
                '}' => level -= 1,
                ',' if level == 0 => item_start = true,
                c if c.is_whitespace() => {}
                _ if item_start && level == 0 => {
                    names.push(identifier(&group[index..]).to_owned());
                    item_start = false;
                }
                _ => {}
            }
        }
    } else {
        names.push(identifier(rest).to_owned());
    }
}

/// The top-level modules that `text`, the source of a module `depth` below the crate root,
/// names by a path from the root.
fn reached(text: &str, depth: usize) -> Vec<String> {
    let mut names = Vec::new();
    for (start, _) in text.match_indices("crate::") {
        let before = text[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        named_at_root(&text[start + "crate::".len()..], &mut names);
    }
    let mut rest = text;
    while let Some(start) = rest.find("super::") {
        let before = rest[..start].chars().next_back();
        let mut chain = &rest[start..];
        let mut climbed = 0;
        while let Some(after) = chain.strip_prefix("super::") {
            climbed += 1;
            chain = after;
        }
        if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') && climbed >= depth {
            named_at_root(chain, &mut names);
        }
        rest = chain;
    }
    names
}

#[test]
fn the_transport_names_no_table_producer_consumer_ops_or_metrics_module() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&root.join("transport"), &mut files);
    assert!(files.len() > 10, "the transport sources: {files:?}");
    let mut breaches = Vec::new();
    for path in &files {
        let text = std::fs::read_to_string(path).expect("a readable source");
        for name in reached(&text, depth(&root, path)) {
            if WALLED_OFF.contains(&name.as_str()) {
                breaches.push(format!("{} reaches `{name}`", path.display()));
            }
        }
    }
    assert!(breaches.is_empty(), "{breaches:#?}");
}

#[test]
fn only_select_reads_the_configuration() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/transport");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let config = ["Outbox", "Config"].concat();
    let readers: Vec<_> = files
        .iter()
        .filter(|path| std::fs::read_to_string(path).is_ok_and(|text| text.contains(&config)))
        .filter_map(|path| path.strip_prefix(&root).ok())
        .collect();
    assert_eq!(readers, [Path::new(READS_CONFIG)]);
}

#[test]
fn paths_are_followed_from_the_root_through_groups_and_super_chains() {
    // Built from pieces, so that this file does not breach its own walls.
    let (root, up) = ("crate", "super");
    let text = format!(
        "use {root}::{{transport::Delivery, metrics::{{self, Outcome}}}};\n\
         let x = {root}::ops::status();\n\
         use {up}::{up}::producer::Relay;\n\
         use {up}::framing;\n\
         not{root}::consumer::X;"
    );
    assert_eq!(
        reached(&text, 2),
        ["transport", "metrics", "ops", "producer"]
    );
    assert_eq!(reached(&text, 3), ["transport", "metrics", "ops"]);
}
