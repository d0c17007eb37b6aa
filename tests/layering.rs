//! The crate's top-level modules depend on each other one way only (the order is written
//! in `src/lib.rs`): every `crate::<module>` path in `src/**/*.rs` is an edge from the
//! module the file belongs to (`src/foo.rs` and `src/foo/**` are `foo`) to `<module>`, and
//! the graph of those edges must have no cycle. `super::` paths never leave a top-level
//! module, so they are not edges. Comments are skipped: a doc link is not a dependency.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Module → modules it uses → where (file:line), for the message.
type Graph = BTreeMap<String, BTreeMap<String, Vec<String>>>;

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module `file` (relative to `src`) belongs to; `None` for the crate roots.
fn module_of(file: &Path) -> Option<String> {
    let first = file.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        f => Some(f.strip_suffix(".rs").unwrap_or(f).to_string()),
    }
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// `text` with every `//` comment blanked out (line breaks kept, so offsets keep their
/// line numbers).
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules named by `crate::` paths in `code` (comments included, so strip
/// them first), each with its byte offset; each item of a `crate::{a::X, b}` group counts.
fn crate_refs_at(code: &str) -> Vec<(String, usize)> {
    let mut refs = Vec::new();
    let mut from = 0;
    while let Some(found) = code[from..].find("crate::") {
        let at = from + found;
        let before = code[..at].chars().next_back();
        let after = &code[at + "crate::".len()..];
        from = at + "crate::".len();
        if before.is_some_and(|c| is_ident(c) || c == '$') {
            continue;
        }
        if let Some(group) = after.strip_prefix('{') {
            let mut depth = 0;
            let mut item_start = true;
            for (i, c) in group.char_indices() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => item_start = true,
                    c if item_start && is_ident(c) => {
                        let name: String =
                            group[i..].chars().take_while(|&c| is_ident(c)).collect();
                        refs.push((name, at));
                        item_start = false;
                    }
                    _ => {}
                }
            }
        } else {
            let name: String = after.chars().take_while(|&c| is_ident(c)).collect();
            if !name.is_empty() {
                refs.push((name, at));
            }
        }
    }
    refs
}

/// The modules [`crate_refs_at`] finds in one line of code, comments removed.
fn crate_refs(line: &str) -> Vec<String> {
    crate_refs_at(&strip_comments(line))
        .into_iter()
        .map(|(m, _)| m)
        .collect()
}

fn crate_graph() -> Graph {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    files.sort();
    let mut graph = Graph::new();
    for file in &files {
        let rel = file.strip_prefix(&src).unwrap();
        let Some(from) = module_of(rel) else {
            continue;
        };
        graph.entry(from.clone()).or_default();
        let code = strip_comments(&std::fs::read_to_string(file).unwrap());
        for (to, at) in crate_refs_at(&code) {
            if to != from && to != "self" && to != "super" {
                let line = code[..at].matches('\n').count() + 1;
                graph
                    .entry(from.clone())
                    .or_default()
                    .entry(to)
                    .or_default()
                    .push(format!("src/{}:{line}", rel.display()));
            }
        }
    }
    graph
}

/// A cycle of `graph`, as the modules along it (the first repeated at the end), if any.
fn find_cycle(graph: &Graph) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &Graph,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(i) = path.iter().position(|n| n == node) {
            let mut cycle = path[i..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flat_map(|e| e.keys()) {
            if let Some(c) = visit(next, graph, done, path) {
                return Some(c);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|n| visit(n, graph, &mut done, &mut Vec::new()))
}

fn describe(graph: &Graph, cycle: &[String]) -> String {
    let mut out = format!("import cycle: {}\n", cycle.join(" -> "));
    for pair in cycle.windows(2) {
        let at = &graph[&pair[0]][&pair[1]];
        out += &format!("  {} -> {}: {}\n", pair[0], pair[1], at.join(", "));
    }
    out
}

#[test]
fn top_level_modules_form_no_cycle() {
    let graph = crate_graph();
    assert!(
        graph.contains_key("proxy") && graph.contains_key("migration"),
        "the module scan found too little: {graph:?}"
    );
    assert!(
        graph["proxy"].contains_key("link"),
        "the scan missed proxy -> link: {graph:?}"
    );
    if let Some(cycle) = find_cycle(&graph) {
        panic!("{}", describe(&graph, &cycle));
    }
}

#[test]
fn the_check_finds_a_cycle() {
    fn edge(graph: &mut Graph, a: &str, b: &str) {
        graph
            .entry(a.to_string())
            .or_default()
            .insert(b.to_string(), vec![format!("src/{a}.rs:1")]);
        graph.entry(b.to_string()).or_default();
    }
    let mut graph = Graph::new();
    edge(&mut graph, "app", "control");
    edge(&mut graph, "control", "link");
    edge(&mut graph, "app", "link");
    assert_eq!(find_cycle(&graph), None);
    edge(&mut graph, "link", "spec");
    edge(&mut graph, "spec", "control");
    let cycle = find_cycle(&graph).expect("control -> link -> spec -> control is a cycle");
    assert_eq!(cycle, ["control", "link", "spec", "control"]);
    assert!(describe(&graph, &cycle).contains("spec -> control: src/spec.rs:1"));
}

#[test]
fn crate_paths_are_read_from_code() {
    assert_eq!(crate_refs("use crate::link::{Direction, Link};"), ["link"]);
    assert_eq!(
        crate_refs("use crate::{config::Config, spec, tap::Tap};"),
        ["config", "spec", "tap"]
    );
    assert_eq!(
        crate_refs("    x: crate::metrics::RouteMetrics, y: crate::qemu::Phase,"),
        ["metrics", "qemu"]
    );
    assert!(crate_refs("//! See [`crate::app::Server`].").is_empty());
    assert!(crate_refs("$crate::foo!()").is_empty());
    assert_eq!(
        crate_refs_at("use crate::{\n    link::Link,\n    tap,\n};"),
        [("link".to_string(), 4), ("tap".to_string(), 4)]
    );
    assert_eq!(
        module_of(Path::new("proxy/pump.rs")).as_deref(),
        Some("proxy")
    );
    assert_eq!(module_of(Path::new("spec.rs")).as_deref(), Some("spec"));
    assert_eq!(module_of(Path::new("lib.rs")), None);
}
