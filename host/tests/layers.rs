//! The library's modules form layers, and the files of the node, the server
//! and the wire layer form no import cycle (README, "Layout"). This test
//! reads `host/src` and fails on an import that breaks either rule, naming
//! the file and the path:
//!
//! - a module may use only modules of a lower layer (so the modules form no
//!   cycle, and the consensus core and the wire layer stay at the bottom);
//! - inside `node`, `server` and `wire`, `mod.rs` only declares the files and
//!   what they export, each file imports its siblings by name (through the
//!   facade's re-exports, which are resolved to the file that defines them),
//!   and those imports form no cycle.
//!
//! It reads source text (comments, strings and `#[cfg(test)]` modules left
//! out), which is all an import is; the checker is itself tested below on
//! small made-up sources.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers, lowest first. A module may use the modules of lower layers
/// only. `raft` is the crate `raft-core` (`host/raft`), re-exported; `cli`
/// is the binary's, which reaches the library as `raft_host::`.
const LAYERS: &[&[&str]] = &[
    &["raft", "process", "faults", "histogram"],
    &["wire"],
    &["storage", "client"],
    &["runtime"],
    &["node"],
    &["server"],
    &["cli"],
];

/// Uses the layers would allow but the design does not, and why.
const FORBIDDEN: &[(&str, &str, &str)] =
    &[("runtime", "raft", "the runtime runs guests over the store; consensus is none of its business")];

/// Folders whose `mod.rs` is a facade and whose files must not import each
/// other in a circle.
const FACADE_FOLDERS: &[&str] = &["node", "server", "wire"];

// ---------------------------------------------------------------- reading

/// Source text with comments, string and char literals blanked out, so that
/// a path in a doc comment or a message is not taken for an import.
fn code_only(source: &str) -> String {
    let chars: Vec<char> = source.chars().collect();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    // Where a raw string literal may start: not inside an identifier (a `b`
    // before the `r` makes a raw byte string).
    let starts_token = |chars: &[char], i: usize| {
        let ident = |c: char| c.is_alphanumeric() || c == '_';
        match i {
            0 => true,
            1 => !ident(chars[0]) || chars[0] == 'b',
            _ => !ident(chars[i - 1]) || (chars[i - 1] == 'b' && !ident(chars[i - 2])),
        }
    };
    while i < chars.len() {
        let c = chars[i];
        let next = chars.get(i + 1).copied();
        if c == '/' && next == Some('/') {
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '/' && next == Some('*') {
            let mut depth = 0;
            while i < chars.len() {
                if chars[i] == '/' && chars.get(i + 1) == Some(&'*') {
                    depth += 1;
                    i += 2;
                } else if chars[i] == '*' && chars.get(i + 1) == Some(&'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            out.push(' ');
        } else if c == 'r' && starts_token(&chars, i) && matches!(next, Some('"') | Some('#')) {
            // A raw string: r"..." or r#"..."#, any number of #.
            let mut j = i + 1;
            let mut hashes = 0;
            while chars.get(j) == Some(&'#') {
                hashes += 1;
                j += 1;
            }
            if chars.get(j) != Some(&'"') {
                out.push(c);
                i += 1;
                continue;
            }
            j += 1;
            loop {
                if j >= chars.len() {
                    break;
                }
                if chars[j] == '"' && (0..hashes).all(|k| chars.get(j + 1 + k) == Some(&'#')) {
                    j += 1 + hashes;
                    break;
                }
                j += 1;
            }
            out.push_str("\"\"");
            i = j;
        } else if c == '"' {
            i += 1;
            while i < chars.len() && chars[i] != '"' {
                i += if chars[i] == '\\' { 2 } else { 1 };
            }
            i += 1;
            out.push_str("\"\"");
        } else if c == '\'' {
            // A char literal ('a', '\n', '\''), or a lifetime ('a), kept.
            if next == Some('\\') {
                // The quote, the backslash and the escaped character.
                i += 3;
                while i < chars.len() && chars[i] != '\'' {
                    i += 1;
                }
                i += 1;
                out.push_str("' '");
            } else if chars.get(i + 2) == Some(&'\'') {
                i += 3;
                out.push_str("' '");
            } else {
                out.push(c);
                i += 1;
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    out
}

/// Removes every `#[cfg(test)]` module: inside one, `super` is the file
/// itself, and tests may use what they like.
fn without_test_modules(code: &str) -> String {
    let mut out = code.to_string();
    while let Some(start) = out.find("#[cfg(test)]") {
        let after = &out[start..];
        let Some(open) = after.find('{') else { break };
        let head = &after[..open];
        if !head.contains("mod ") {
            // A test-only item that is not a module: drop only the attribute.
            out.replace_range(start..start + "#[cfg(test)]".len(), "");
            continue;
        }
        let mut depth = 0;
        let mut end = start + open;
        for (offset, c) in out[start + open..].char_indices() {
            match c {
                '{' => depth += 1,
                '}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = start + open + offset + 1;
                        break;
                    }
                }
                _ => {}
            }
        }
        out.replace_range(start..end, "");
    }
    out
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Token {
    Ident(String),
    PathSep,
    Open,
    Close,
    Comma,
    Glob,
    Other(char),
}

fn tokens(code: &str) -> Vec<Token> {
    let chars: Vec<char> = code.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_alphanumeric() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Ident(chars[start..i].iter().collect()));
            continue;
        }
        if c == ':' && chars.get(i + 1) == Some(&':') {
            out.push(Token::PathSep);
            i += 2;
            continue;
        }
        match c {
            '{' => out.push(Token::Open),
            '}' => out.push(Token::Close),
            ',' => out.push(Token::Comma),
            '*' => out.push(Token::Glob),
            c if c.is_whitespace() => {}
            c => out.push(Token::Other(c)),
        }
        i += 1;
    }
    out
}

/// One path a file refers to, and the name it brings into scope when it is
/// a `use` (the last segment, or its `as` alias).
#[derive(Clone, Debug, PartialEq, Eq)]
struct PathRef {
    segments: Vec<String>,
    name: String,
    from_use: bool,
}

/// Expands the use tree starting at `tokens[*at]` under `prefix`.
fn use_tree(tokens: &[Token], at: &mut usize, prefix: &[String], out: &mut Vec<PathRef>) {
    let mut segments = prefix.to_vec();
    loop {
        match tokens.get(*at) {
            Some(Token::Ident(name)) => {
                segments.push(name.clone());
                *at += 1;
            }
            Some(Token::Open) => {
                *at += 1;
                loop {
                    match tokens.get(*at) {
                        Some(Token::Close) => {
                            *at += 1;
                            return;
                        }
                        Some(Token::Comma) => *at += 1,
                        None => return,
                        _ => use_tree(tokens, at, &segments, out),
                    }
                }
            }
            Some(Token::Glob) => {
                *at += 1;
                segments.push("*".to_string());
                out.push(PathRef { name: "*".into(), segments, from_use: true });
                return;
            }
            _ => return,
        }
        match tokens.get(*at) {
            Some(Token::PathSep) => *at += 1,
            Some(Token::Ident(word)) if word == "as" => {
                *at += 1;
                let alias = match tokens.get(*at) {
                    Some(Token::Ident(alias)) => alias.clone(),
                    _ => String::new(),
                };
                *at += 1;
                out.push(PathRef { name: alias, segments, from_use: true });
                return;
            }
            _ => {
                let name = segments.last().cloned().unwrap_or_default();
                out.push(PathRef { name, segments, from_use: true });
                return;
            }
        }
    }
}

/// Every path a piece of code refers to: the expanded `use` statements, and
/// paths written inline that start at `crate`, `raft_host` or `super`.
fn paths(code: &str) -> Vec<PathRef> {
    let tokens = tokens(code);
    let mut out = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        if tokens[i] == Token::Ident("use".into()) {
            i += 1;
            let start = out.len();
            use_tree(&tokens, &mut i, &[], &mut out);
            debug_assert!(out.len() >= start);
            continue;
        }
        if let Token::Ident(root) = &tokens[i]
            && matches!(root.as_str(), "crate" | "raft_host" | "super")
            && tokens.get(i + 1) == Some(&Token::PathSep)
            && (i == 0 || tokens[i - 1] != Token::PathSep)
        {
            let mut segments = vec![root.clone()];
            let mut j = i + 1;
            while tokens.get(j) == Some(&Token::PathSep) {
                match tokens.get(j + 1) {
                    Some(Token::Ident(next)) => segments.push(next.clone()),
                    _ => break,
                }
                j += 2;
            }
            let name = segments.last().cloned().unwrap_or_default();
            out.push(PathRef { segments, name, from_use: false });
            i = j;
            continue;
        }
        i += 1;
    }
    out
}

/// What is left of a facade once its declarations and re-exports are gone:
/// nothing, if it is one.
fn facade_leftovers(code: &str) -> String {
    let mut rest = String::new();
    for statement in code.split(';') {
        let mut statement = statement.trim();
        while let Some(attribute) = statement.strip_prefix("#[") {
            statement = attribute.split_once(']').map_or("", |(_, after)| after).trim_start();
        }
        for visibility in ["pub(crate) ", "pub(super) ", "pub "] {
            statement = statement.strip_prefix(visibility).unwrap_or(statement);
        }
        if !statement.is_empty() && !statement.starts_with("mod ") && !statement.starts_with("use ") {
            rest.push_str(statement);
            rest.push('\n');
        }
    }
    rest
}

// ---------------------------------------------------------------- graphs

/// A source file of the library, by its path under `src`.
struct SourceFile {
    /// For example `node/core.rs`.
    path: String,
    code: String,
}

impl SourceFile {
    /// The top-level module the file belongs to (`node`, `client`, ...).
    fn module(&self) -> &str {
        let first = self.path.split('/').next().unwrap_or("");
        first.strip_suffix(".rs").unwrap_or(first)
    }

    /// Its folder and its name in that folder, for files one level down.
    fn in_folder(&self) -> Option<(&str, &str)> {
        let (folder, file) = self.path.split_once('/')?;
        Some((folder, file.strip_suffix(".rs")?))
    }
}

/// An edge of a dependency graph and where it comes from.
type Edges = BTreeMap<(String, String), String>;

/// The modules each module uses (`crate::x` in the library, `raft_host::x`
/// in the binary), with one place that shows it.
fn module_edges(files: &[SourceFile]) -> Edges {
    let mut edges = Edges::new();
    for file in files {
        if file.path == "lib.rs" || file.path == "main.rs" {
            continue;
        }
        for path in paths(&file.code) {
            let [root, target, ..] = path.segments.as_slice() else { continue };
            if (root == "crate" || root == "raft_host") && target != file.module() && target != "cli" {
                edges
                    .entry((file.module().to_string(), target.clone()))
                    .or_insert_with(|| format!("{} uses {}", file.path, path.segments.join("::")));
            }
        }
    }
    edges
}

/// The files of `folder` each of its files uses, and the paths that cannot
/// be placed (a name the facade does not export, a glob through it).
fn file_edges(files: &[SourceFile], folder: &str) -> (Edges, Vec<String>) {
    let siblings: BTreeSet<&str> = files
        .iter()
        .filter_map(|f| f.in_folder())
        .filter(|(d, name)| *d == folder && !name.contains('/'))
        .map(|(_, name)| name)
        .collect();
    let facade = files.iter().find(|f| f.path == format!("{folder}/mod.rs"));
    // Each name the facade re-exports, and the file it comes from.
    let mut exported: BTreeMap<String, String> = BTreeMap::new();
    if let Some(facade) = facade {
        for path in paths(&facade.code).into_iter().filter(|p| p.from_use) {
            if let [root, file, ..] = path.segments.as_slice()
                && root == "self"
                && siblings.contains(file.as_str())
            {
                exported.insert(path.name.clone(), file.clone());
            }
        }
    }
    let mut edges = Edges::new();
    let mut unresolved = Vec::new();
    for file in files {
        let Some((in_folder, name)) = file.in_folder() else { continue };
        if in_folder != folder || name == "mod" {
            continue;
        }
        // A file in a subfolder (`server/client_service/watch.rs`) is a
        // child module of its sibling file of that name: part of it, whose
        // `super` is that file and whose `super::super` is the folder.
        let (name, nested) = match name.split_once('/') {
            Some((parent, _)) => (parent, true),
            None => (name, false),
        };
        for path in paths(&file.code) {
            let rest = match path.segments.as_slice() {
                [root, up, rest @ ..] if nested && root == "super" && up == "super" => rest,
                [root, ..] if nested && root == "super" => continue,
                [root, rest @ ..] if root == "super" => rest,
                [root, module, rest @ ..] if root == "crate" && module == folder => rest,
                _ => continue,
            };
            let Some(first) = rest.first() else { continue };
            let target = if siblings.contains(first.as_str()) {
                first.clone()
            } else if let Some(defined_in) = exported.get(first) {
                defined_in.clone()
            } else {
                unresolved.push(format!("{} uses {}", file.path, path.segments.join("::")));
                continue;
            };
            if target != name {
                edges
                    .entry((name.to_string(), target))
                    .or_insert_with(|| format!("{} uses {}", file.path, path.segments.join("::")));
            }
        }
    }
    (edges, unresolved)
}

/// A cycle in the graph, as the places that make it up, if there is one.
fn find_cycle(edges: &Edges) -> Option<Vec<String>> {
    let mut next: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for (from, to) in edges.keys() {
        next.entry(from).or_default().push(to);
    }
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        Open,
        Done,
    }
    fn visit<'a>(
        node: &'a str,
        next: &BTreeMap<&'a str, Vec<&'a str>>,
        marks: &mut BTreeMap<&'a str, Mark>,
        stack: &mut Vec<&'a str>,
    ) -> Option<Vec<&'a str>> {
        match marks.get(node) {
            Some(Mark::Done) => return None,
            Some(Mark::Open) => {
                let from = stack.iter().position(|n| *n == node).unwrap_or(0);
                let mut cycle = stack[from..].to_vec();
                cycle.push(node);
                return Some(cycle);
            }
            None => {}
        }
        marks.insert(node, Mark::Open);
        stack.push(node);
        for &to in next.get(node).map(Vec::as_slice).unwrap_or(&[]) {
            if let Some(cycle) = visit(to, next, marks, stack) {
                return Some(cycle);
            }
        }
        stack.pop();
        marks.insert(node, Mark::Done);
        None
    }
    let mut marks = BTreeMap::new();
    for &start in next.keys() {
        let mut stack = Vec::new();
        if let Some(cycle) = visit(start, &next, &mut marks, &mut stack) {
            return Some(
                cycle.windows(2).map(|pair| edges[&(pair[0].to_string(), pair[1].to_string())].clone()).collect(),
            );
        }
    }
    None
}

/// Edges that go up or sideways in [`LAYERS`] or are [`FORBIDDEN`], and
/// modules it does not name.
fn layer_violations(edges: &Edges) -> Vec<String> {
    let layer = |module: &str| LAYERS.iter().position(|layer| layer.contains(&module));
    let mut out = Vec::new();
    for ((from, to), place) in edges {
        if let Some((_, _, why)) = FORBIDDEN.iter().find(|(f, t, _)| f == from && t == to) {
            out.push(format!("{from} may not use {to} ({why}): {place}"));
            continue;
        }
        match (layer(from), layer(to)) {
            (Some(a), Some(b)) if b < a => {}
            (Some(_), Some(_)) => out.push(format!("{from} may not use {to}, which is not below it: {place}")),
            _ => out.push(format!("{from} or {to} has no layer in LAYERS: {place}")),
        }
    }
    out
}

// ---------------------------------------------------------------- the tree

fn read_tree(dir: &Path, under: &Path, out: &mut Vec<SourceFile>) {
    let mut entries: Vec<PathBuf> =
        std::fs::read_dir(dir).expect("readable folder").map(|e| e.expect("entry").path()).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            read_tree(&path, under, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).expect("readable source");
            let relative = path.strip_prefix(under).expect("under src").to_string_lossy().replace('\\', "/");
            out.push(SourceFile { path: relative, code: without_test_modules(&code_only(&source)) });
        }
    }
}

#[test]
fn modules_use_only_lower_layers_and_node_server_and_wire_files_form_no_cycle() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    read_tree(&src, &src, &mut files);
    assert!(files.len() > 30, "expected the library's sources in {}", src.display());

    let mut problems = Vec::new();
    let modules = module_edges(&files);
    problems.extend(layer_violations(&modules));
    if let Some(cycle) = find_cycle(&modules) {
        problems.push(format!("modules import each other in a circle:\n    {}", cycle.join("\n    ")));
    }
    for folder in FACADE_FOLDERS {
        let facade = files.iter().find(|f| f.path == format!("{folder}/mod.rs")).expect("the folder's mod.rs");
        let leftovers = facade_leftovers(&facade.code);
        if let Some(first) = leftovers.lines().map(str::trim).find(|line| !line.is_empty()) {
            problems.push(format!("{folder}/mod.rs holds more than declarations and re-exports, from: {first}"));
        }
        let (edges, unresolved) = file_edges(&files, folder);
        problems.extend(unresolved.into_iter().map(|place| format!("not placed in a file of {folder}: {place}")));
        if let Some(cycle) = find_cycle(&edges) {
            problems.push(format!("files of {folder} import each other in a circle:\n    {}", cycle.join("\n    ")));
        }
        assert!(!edges.is_empty(), "the files of {folder} import each other somewhere");
    }
    // The layers the README draws are the ones found in the code.
    for (from, to) in [("node", "raft"), ("server", "node"), ("node", "wire"), ("storage", "wire")] {
        assert!(modules.contains_key(&(from.into(), to.into())), "{from} uses {to}");
    }
    assert!(problems.is_empty(), "the layering of host/src is broken:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------- the checker

fn file(path: &str, source: &str) -> SourceFile {
    SourceFile { path: path.into(), code: without_test_modules(&code_only(source)) }
}

#[test]
fn the_checker_finds_a_cycle_between_modules_and_a_use_of_a_higher_layer() {
    let files = vec![
        file("wire/mod.rs", "mod a;"),
        file("wire/a.rs", "use crate::node::{Handle, other::Thing};"),
        file("node/mod.rs", "mod b;"),
        file("node/b.rs", "fn f() { crate::wire::encode(); }"),
    ];
    let edges = module_edges(&files);
    assert!(edges.contains_key(&("wire".into(), "node".into())));
    assert!(edges.contains_key(&("node".into(), "wire".into())));
    let cycle = find_cycle(&edges).expect("a cycle");
    assert_eq!(cycle.len(), 2, "{cycle:?}");
    let violations = layer_violations(&edges);
    assert_eq!(violations.len(), 1, "{violations:?}");
    assert!(violations[0].starts_with("wire may not use node"), "{violations:?}");
    let below_but_forbidden = module_edges(&[file("runtime/mod.rs", "use crate::raft::Index;")]);
    let violations = layer_violations(&below_but_forbidden);
    assert!(violations.len() == 1 && violations[0].starts_with("runtime may not use raft"), "{violations:?}");
}

#[test]
fn the_checker_resolves_the_facade_and_finds_a_cycle_between_files() {
    let files = vec![
        file("node/mod.rs", "mod a;\nmod b;\nmod c;\npub use self::c::{Widget as Gadget, Tool};\n"),
        file("node/a.rs", "use super::b::Thing;\n"),
        file("node/b.rs", "use super::Gadget;\n"),
        file(
            "node/c.rs",
            "// use super::b::Commented;\nfn f() { let s = \"super::b::InAString\"; super::a::call(); }\n\
             #[cfg(test)]\nmod tests { use super::*; use super::super::b::Fine; }\n",
        ),
    ];
    let (edges, unresolved) = file_edges(&files, "node");
    assert!(unresolved.is_empty(), "{unresolved:?}");
    let pairs: Vec<(String, String)> = edges.keys().cloned().collect();
    assert_eq!(
        pairs,
        vec![("a".into(), "b".into()), ("b".into(), "c".into()), ("c".into(), "a".into())],
        "b reaches c through the facade's alias; comments, strings and tests count for nothing"
    );
    let cycle = find_cycle(&edges).expect("a cycle");
    assert_eq!(cycle.len(), 3, "{cycle:?}");
    assert!(facade_leftovers(&files[0].code).trim().is_empty());
    assert!(!facade_leftovers("mod a;\npub struct Config;\n").trim().is_empty());

    let (_, unresolved) =
        file_edges(&[file("node/mod.rs", "mod a;"), file("node/a.rs", "use super::Nowhere;")], "node");
    assert_eq!(unresolved, vec!["node/a.rs uses super::Nowhere".to_string()]);

    // A child module in a subfolder is part of its parent file: its `super`
    // is that file, its `super::super` the folder.
    let nested = vec![
        file("node/mod.rs", "mod a;\nmod b;\n"),
        file("node/a.rs", "mod child;\nfn f() {}\n"),
        file("node/a/child.rs", "use super::f;\nuse super::super::b::Thing;\n"),
        file("node/b.rs", "pub struct Thing;\n"),
    ];
    let (edges, unresolved) = file_edges(&nested, "node");
    assert!(unresolved.is_empty(), "{unresolved:?}");
    assert_eq!(edges.keys().cloned().collect::<Vec<_>>(), vec![("a".to_string(), "b".to_string())]);
}

#[test]
fn an_acyclic_graph_has_no_cycle() {
    let mut edges = Edges::new();
    for (from, to) in [("a", "b"), ("b", "c"), ("a", "c"), ("d", "a")] {
        edges.insert((from.into(), to.into()), String::new());
    }
    assert_eq!(find_cycle(&edges), None);
}
