//! The walls between the library's modules, held by reading the sources.
//!
//! Every path a file names (`use` lines, `pub use` re-exports, inline `crate::...` paths,
//! `super::` and `self::` chains, paths through a child module it declares) is resolved to the
//! module it reaches, comments and string literals left out. The walls:
//! - `transport` reaches no table, producer, consumer, ops or metrics module: what a consumer must
//!   record reaches it as an event;
//! - `producer` and `consumer` never reach each other;
//! - `ops` never reaches the producer: state it needs is data in the tables;
//! - transports take their own settings: in `transport`, only `select.rs` names `OutboxConfig`;
//! - a module imports from the defining module, never through the crate root's re-exports;
//! - no import loops between the crate's top-level modules. `error` is the vocabulary every
//!   module speaks: paths into it are not counted as edges (its own `From` conversions name the
//!   modules whose errors it wraps). The crate root and the deprecated paths only re-export.
//!
//! Each wall has a fixture that breaks it, in the tests below.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// A source file: its module path (`["producer", "settle"]`; `[]` for `lib.rs`) and its text.
struct Source {
    file: String,
    module: Vec<String>,
    text: String,
}

/// A path a file names, resolved from the crate root.
struct Reference {
    file: String,
    line: usize,
    from: Vec<String>,
    to: Vec<String>,
}

/// What [`check`] found: one line per breach.
fn check(sources: &[Source]) -> Vec<String> {
    let top: BTreeSet<String> = sources
        .iter()
        .filter_map(|source| source.module.first().cloned())
        .collect();
    let mut breaches = Vec::new();
    let mut edges: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for reference in sources.iter().flat_map(references) {
        let from = reference.from.first().map(String::as_str).unwrap_or("");
        let Some(to) = reference.to.first().map(String::as_str) else {
            continue;
        };
        let at = format!("{}:{}", reference.file, reference.line);
        let shown = format!("crate::{}", reference.to.join("::"));
        if !top.contains(to) && !from.is_empty() && from != "deprecated" && to != "__private" {
            breaches.push(format!(
                "{at}: `{shown}` goes through the crate root: import from the defining module"
            ));
            continue;
        }
        let forbidden = match from {
            "transport" if to == "config" => {
                reference
                    .to
                    .get(1)
                    .is_some_and(|item| item == "OutboxConfig")
                    && reference.file != "src/transport/select.rs"
            }
            "transport" => ["tables", "producer", "consumer", "ops", "metrics"].contains(&to),
            "producer" => to == "consumer",
            "consumer" => to == "producer",
            "ops" => to == "producer",
            _ => false,
        };
        if forbidden {
            breaches.push(format!("{at}: `{from}` must not reach `{shown}`"));
        }
        if !from.is_empty() && from != "deprecated" && from != to && to != "error" {
            edges
                .entry(from.to_owned())
                .or_default()
                .insert(to.to_owned());
        }
    }
    for cycle in cycles(&edges) {
        breaches.push(format!("import loop: {}", cycle.join(" -> ")));
    }
    breaches
}

/// The modules that reach themselves again, each loop once (as found from its smallest module).
fn cycles(edges: &BTreeMap<String, BTreeSet<String>>) -> Vec<Vec<String>> {
    let mut found = Vec::new();
    for start in edges.keys() {
        // A breadth-first search for the shortest way back to `start` through larger names only,
        // so that each loop is reported once.
        let mut previous: BTreeMap<&str, &str> = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([start.as_str()]);
        let mut back = None;
        while let Some(at) = queue.pop_front() {
            for next in edges.get(at).into_iter().flatten() {
                if next == start {
                    back = Some(at);
                    break;
                }
                if next.as_str() > start.as_str() && !previous.contains_key(next.as_str()) {
                    previous.insert(next, at);
                    queue.push_back(next);
                }
            }
            if back.is_some() {
                break;
            }
        }
        if let Some(mut at) = back {
            let mut path = vec![start.clone()];
            while at != start {
                path.push(at.to_owned());
                at = previous[at];
            }
            path[1..].reverse();
            path.push(start.clone());
            found.push(path);
        }
    }
    found
}

/// Every path `source` names, resolved.
fn references(source: &Source) -> Vec<Reference> {
    let code = strip(&source.text);
    let own = source.module.clone();
    let children: BTreeSet<String> = declared_modules(&code);
    let mut found = Vec::new();
    let mut add = |offset: usize, path: Vec<String>| {
        if let Some(to) = resolve(&path, &own, &children) {
            found.push(Reference {
                file: source.file.clone(),
                line: code[..offset].matches('\n').count() + 1,
                from: source.module.clone(),
                to,
            });
        }
    };
    for (offset, tree) in use_trees(&code) {
        for path in expand(&tree) {
            add(offset, path);
        }
    }
    for (offset, path) in inline_paths(&code) {
        add(offset, path);
    }
    found
}

/// A path resolved from the crate root; `None` for paths into other crates or `std`.
fn resolve(path: &[String], own: &[String], children: &BTreeSet<String>) -> Option<Vec<String>> {
    let first = path.first()?;
    let (mut base, rest) = match first.as_str() {
        "crate" | "$crate" => (Vec::new(), &path[1..]),
        "self" => (own.to_vec(), &path[1..]),
        "super" => {
            let mut base = own.to_vec();
            let mut rest = path;
            while rest.first().is_some_and(|s| s == "super") {
                base.pop();
                rest = &rest[1..];
            }
            (base, rest)
        }
        name if children.contains(name) => (own.to_vec(), path),
        _ => return None,
    };
    base.extend(rest.iter().cloned());
    Some(base)
}

/// The names of the modules a file declares (`mod x;`, `pub(crate) mod x;`, `mod x { .. }`).
fn declared_modules(code: &str) -> BTreeSet<String> {
    let words: Vec<&str> = code
        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
        .filter(|w| !w.is_empty())
        .collect();
    words
        .windows(2)
        .filter(|pair| pair[0] == "mod")
        .map(|pair| pair[1].to_owned())
        .collect()
}

/// The tree of every `use` item, with the offset where it starts.
fn use_trees(code: &str) -> Vec<(usize, String)> {
    let mut trees = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find("use ") {
        let start = from + found;
        from = start + 4;
        let before = code[..start].chars().next_back();
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        if let Some(end) = code[from..].find(';') {
            trees.push((start, code[from..from + end].to_owned()));
            from += end;
        }
    }
    trees
}

/// The paths of a `use` tree: `crate::{a::{b, c}, d as e}` gives `crate::a::b`, `crate::a::c`,
/// `crate::d`.
fn expand(tree: &str) -> Vec<Vec<String>> {
    let mut tree = tree.split_whitespace().collect::<Vec<_>>().join(" ");
    for token in ["::", "{", "}", ","] {
        tree = tree
            .replace(&format!(" {token}"), token)
            .replace(&format!("{token} "), token);
    }
    let mut out = Vec::new();
    expand_into(&tree, Vec::new(), &mut out);
    out
}

fn expand_into(tree: &str, prefix: Vec<String>, out: &mut Vec<Vec<String>>) {
    let mut path = prefix;
    if let Some(open) = tree.find('{') {
        path.extend(segments(&tree[..open]));
        let inner = &tree[open + 1..tree.rfind('}').unwrap_or(tree.len())];
        for part in split_top(inner) {
            expand_into(part, path.clone(), out);
        }
        return;
    }
    path.extend(segments(tree.split(" as ").next().unwrap_or(tree)));
    if path.last().is_some_and(|last| last == "self") {
        path.pop();
    }
    if !path.is_empty() {
        out.push(path);
    }
}

/// The segments of `a::b::c`.
fn segments(path: &str) -> Vec<String> {
    path.split("::")
        .map(str::trim)
        .filter(|s| !s.is_empty() && *s != "*")
        .map(str::to_owned)
        .collect()
}

/// `a, b::{c, d}, e` split at its top-level commas.
fn split_top(list: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (at, c) in list.char_indices() {
        match c {
            '{' => depth += 1,
            '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&list[start..at]);
                start = at + 1;
            }
            _ => {}
        }
    }
    parts.push(&list[start..]);
    parts.into_iter().filter(|p| !p.is_empty()).collect()
}

/// Paths outside `use` items that start at `crate::`, `$crate::`, `super::` or `self::`.
fn inline_paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let mut paths = Vec::new();
    let bytes = code.as_bytes();
    let in_use: Vec<(usize, usize)> = use_trees(code)
        .into_iter()
        .map(|(start, tree)| (start, start + 4 + tree.len()))
        .collect();
    let mut at = 0;
    while at < code.len() {
        let rest = &code[at..];
        let starts = ["$crate::", "crate::", "super::", "self::"]
            .iter()
            .find(|start| rest.starts_with(**start));
        let boundary = at == 0
            || !(bytes[at - 1].is_ascii_alphanumeric()
                || bytes[at - 1] == b'_'
                || bytes[at - 1] == b':');
        match starts {
            Some(_) if boundary && !in_use.iter().any(|(s, e)| (*s..*e).contains(&at)) => {
                let end = rest
                    .find(|c: char| !(c.is_alphanumeric() || c == '_' || c == ':' || c == '$'))
                    .unwrap_or(rest.len());
                paths.push((at, segments(rest[..end].trim_end_matches(':'))));
                at += end.max(1);
            }
            _ => at += rest.chars().next().map_or(1, char::len_utf8),
        }
    }
    paths
}

/// `code` without comments (doc comments included) and without the contents of string and
/// character literals, lines kept.
fn strip(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut chars = code.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '/' if chars.peek() == Some(&'/') => {
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                        break;
                    }
                }
            }
            '/' if chars.peek() == Some(&'*') => {
                let mut last = ' ';
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if last == '*' && c == '/' {
                        break;
                    }
                    last = c;
                }
            }
            'r' if chars.peek() == Some(&'#') || chars.peek() == Some(&'"') => {
                let mut hashes = 0;
                while chars.peek() == Some(&'#') {
                    chars.next();
                    hashes += 1;
                }
                if chars.peek() != Some(&'"') {
                    out.push('r');
                    continue;
                }
                chars.next();
                out.push_str("\"\"");
                let closing: String = std::iter::once('"')
                    .chain(std::iter::repeat_n('#', hashes))
                    .collect();
                let mut tail = String::new();
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    tail.push(c);
                    if tail.ends_with(&closing) {
                        break;
                    }
                }
            }
            '"' => {
                out.push_str("\"\"");
                let mut escaped = false;
                for c in chars.by_ref() {
                    if c == '\n' {
                        out.push('\n');
                    }
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        break;
                    }
                }
            }
            '\'' => {
                // A character literal ('x', '\n', '\''), or a lifetime ('a), kept as it is.
                let ahead: String = chars.clone().take(3).collect();
                let literal = ahead.starts_with('\\') || ahead.chars().nth(1) == Some('\'');
                if literal {
                    let mut escaped = false;
                    for c in chars.by_ref() {
                        if escaped {
                            escaped = false;
                        } else if c == '\\' {
                            escaped = true;
                        } else if c == '\'' {
                            break;
                        }
                    }
                    out.push_str("' '");
                } else {
                    out.push('\'');
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The library's sources, read from `dir` (its `src`).
fn read_sources(dir: &Path) -> Vec<Source> {
    let mut sources = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&at) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                let relative = path
                    .strip_prefix(dir)
                    .map(|p| p.to_string_lossy().replace('\\', "/"))
                    .unwrap_or_default();
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                sources.push(source(&relative, &text));
            }
        }
    }
    sources.sort_by(|a, b| a.file.cmp(&b.file));
    sources
}

/// A source at `relative` (to `src`): `producer/settle.rs` is module `producer::settle`.
fn source(relative: &str, text: &str) -> Source {
    let mut module: Vec<String> = relative
        .trim_end_matches(".rs")
        .split('/')
        .map(str::to_owned)
        .collect();
    if matches!(module.last().map(String::as_str), Some("mod" | "lib")) {
        module.pop();
    }
    Source {
        file: format!("src/{relative}"),
        module,
        text: text.to_owned(),
    }
}

#[test]
fn the_library_keeps_its_walls() {
    let sources = read_sources(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"));
    assert!(
        sources.len() > 50 && sources.iter().any(|s| s.file == "src/producer/mod.rs"),
        "the sources were not found"
    );
    let breaches = check(&sources);
    assert!(
        breaches.is_empty(),
        "walls broken:\n{}",
        breaches.join("\n")
    );
}

#[cfg(test)]
mod fixtures {
    use super::*;

    /// A small crate: the root declares the modules; each fixture adds one file.
    fn crate_with(file: &str, text: &str) -> Vec<Source> {
        let mut sources = vec![
            source(
                "lib.rs",
                "pub mod config;\npub mod consumer;\npub mod error;\npub mod ops;\n\
                 pub mod producer;\npub mod tables;\npub mod transport;\npub use error::Error;\n",
            ),
            source("config/mod.rs", "pub struct OutboxConfig;\n"),
            source("consumer/mod.rs", "pub mod topology;\n"),
            source("consumer/topology.rs", "pub const SAC: &str = \"x\";\n"),
            source("error.rs", "pub struct Error;\n"),
            source("ops/mod.rs", "use crate::tables::published;\n"),
            source("producer/mod.rs", "pub struct Producer;\n"),
            source("tables/mod.rs", "pub mod published;\n"),
            source("tables/published.rs", "pub struct Model;\n"),
            source(
                "transport/mod.rs",
                "mod select;\nmod stomp;\npub use stomp::Stomp;\n",
            ),
            source("transport/select.rs", "\n"),
            source("transport/stomp.rs", "pub struct Stomp;\n"),
        ];
        sources.retain(|s| s.file != format!("src/{file}"));
        sources.push(source(file, text));
        sources
    }

    fn breaches(file: &str, text: &str) -> Vec<String> {
        check(&crate_with(file, text))
    }

    #[test]
    fn the_fixture_crate_itself_keeps_every_wall() {
        assert_eq!(
            breaches("error.rs", "pub struct Error;\n"),
            Vec::<String>::new()
        );
    }

    #[test]
    fn a_transport_reaching_the_consumer_by_a_use_line_is_a_breach() {
        let found = breaches(
            "transport/stomp.rs",
            "use crate::consumer::topology::SAC;\npub struct Stomp;\n",
        );
        assert!(
            found
                .iter()
                .any(|b| b.contains("`transport` must not reach `crate::consumer::topology::SAC`")),
            "{found:?}"
        );
    }

    #[test]
    fn a_transport_reaching_a_table_by_an_inline_path_is_a_breach() {
        let found = breaches(
            "transport/stomp.rs",
            "pub struct Stomp;\nfn f() { let _ = crate::tables::published::Model; }\n",
        );
        assert!(
            found.iter().any(|b| b.contains("src/transport/stomp.rs:2")
                && b.contains("`transport` must not reach")),
            "{found:?}"
        );
    }

    #[test]
    fn a_transport_reaching_the_producer_through_super_is_a_breach() {
        let found = breaches(
            "transport/stomp.rs",
            "pub struct Stomp;\nfn f() { let _ = super::super::producer::Producer; }\n",
        );
        assert!(
            found
                .iter()
                .any(|b| b.contains("must not reach `crate::producer::Producer`")),
            "{found:?}"
        );
    }

    #[test]
    fn a_transport_reaching_ops_in_a_grouped_use_is_a_breach() {
        let found = breaches(
            "transport/mod.rs",
            "mod stomp;\npub use stomp::Stomp;\nuse crate::{error::Error, ops::{self}};\n",
        );
        assert!(
            found
                .iter()
                .any(|b| b.contains("must not reach `crate::ops`")),
            "{found:?}"
        );
    }

    #[test]
    fn a_transport_reading_the_settings_outside_select_is_a_breach() {
        let found = breaches(
            "transport/stomp.rs",
            "pub struct Stomp;\nfn f(c: &crate::config::OutboxConfig) {}\n",
        );
        assert!(
            found
                .iter()
                .any(|b| b.contains("`transport` must not reach `crate::config::OutboxConfig`")),
            "{found:?}"
        );
        let allowed = breaches(
            "transport/select.rs",
            "fn f(c: &crate::config::OutboxConfig) {}\n",
        );
        assert_eq!(allowed, Vec::<String>::new());
    }

    #[test]
    fn the_producer_reaching_the_consumer_is_a_breach() {
        let found = breaches(
            "producer/mod.rs",
            "pub struct Producer;\nuse crate::consumer::topology;\n",
        );
        assert!(
            found
                .iter()
                .any(|b| b.contains("`producer` must not reach")),
            "{found:?}"
        );
    }

    #[test]
    fn the_consumer_reaching_the_producer_is_a_breach() {
        let found = breaches(
            "consumer/topology.rs",
            "pub const SAC: &str = \"x\";\nfn f() { let _ = crate::producer::Producer; }\n",
        );
        assert!(
            found
                .iter()
                .any(|b| b.contains("`consumer` must not reach")),
            "{found:?}"
        );
    }

    #[test]
    fn ops_reaching_the_producer_is_a_breach() {
        let found = breaches("ops/mod.rs", "use crate::producer::Producer;\n");
        assert!(
            found.iter().any(|b| b.contains("`ops` must not reach")),
            "{found:?}"
        );
    }

    #[test]
    fn an_import_through_the_crate_root_is_a_breach() {
        let found = breaches("ops/mod.rs", "use crate::Error;\n");
        assert!(
            found
                .iter()
                .any(|b| b.contains("goes through the crate root")),
            "{found:?}"
        );
    }

    #[test]
    fn an_import_loop_is_a_breach() {
        let mut sources = crate_with("ops/mod.rs", "use crate::tables::published::Model;\n");
        sources.retain(|s| s.file != "src/tables/published.rs");
        sources.push(source(
            "tables/published.rs",
            "pub struct Model;\nuse crate::ops;\n",
        ));
        let found = check(&sources);
        assert!(
            found
                .iter()
                .any(|b| b == "import loop: ops -> tables -> ops"),
            "{found:?}"
        );
    }

    #[test]
    fn comments_and_strings_are_not_paths() {
        let found = breaches(
            "transport/stomp.rs",
            "//! See [`crate::consumer::topology`].\npub struct Stomp;\n\
             /* crate::producer::Producer */\nconst S: &str = \"crate::ops\";\n",
        );
        assert_eq!(found, Vec::<String>::new());
    }
}
