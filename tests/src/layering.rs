//! The import-layering guard: builds the graph of a crate's top-level modules
//! from the paths its product code names (`crate::x`, `crate::{x, y::z}`, and
//! `super::` chains that climb to the crate root), leaving out test code
//! (`#[cfg(test)]` items and modules, `tests.rs`, `tests/` folders), and finds
//! the import cycles in it, each told with the file and line of every edge.
//!
//! Read as text, not compiled: comments and string literals are skipped, doc
//! comments count (an intra-doc link is a reference too).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Where an edge is mentioned: file (relative to the source folder) and line.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mention {
    pub file: PathBuf,
    pub line: usize,
}

/// A crate's top-level module graph: `edges[a][b]` are the places where
/// module `a` names module `b`.
#[derive(Debug, Default)]
pub struct ModuleGraph {
    pub modules: BTreeSet<String>,
    pub edges: BTreeMap<String, BTreeMap<String, Vec<Mention>>>,
}

/// One import cycle: modules in order (the last names the first), with the
/// places of each edge.
#[derive(Debug)]
pub struct Cycle {
    pub path: Vec<String>,
    pub edges: Vec<(String, String, Vec<Mention>)>,
}

/// Reads the crate whose sources are in `src` (its `main.rs` / `lib.rs`
/// folder). A `bin` folder is not a module.
pub fn module_graph(src: &Path) -> anyhow::Result<ModuleGraph> {
    let mut files: Vec<(String, PathBuf)> = Vec::new();
    for entry in fs_err::read_dir(src)? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        if path.is_dir() {
            if name != "bin" {
                for file in rust_files(&path)? {
                    files.push((name.clone(), file));
                }
            }
        } else if let Some(stem) = name.strip_suffix(".rs")
            && stem != "main"
            && stem != "lib"
        {
            files.push((stem.to_owned(), path));
        }
    }
    let mut graph = ModuleGraph {
        modules: files.iter().map(|(m, _)| m.clone()).collect(),
        edges: BTreeMap::new(),
    };
    let mut test_only: BTreeSet<PathBuf> = BTreeSet::new();
    // Files of modules declared `#[cfg(test)] mod x;` (in the crate root too).
    for root in ["main.rs", "lib.rs"] {
        let path = src.join(root);
        if path.exists() {
            let text = fs_err::read_to_string(&path)?;
            test_only.extend(test_module_files(src, &path, &scan(&text)));
        }
    }
    let mut scanned = Vec::new();
    for (module, path) in &files {
        let text = fs_err::read_to_string(path)?;
        let lexed = scan(&text);
        test_only.extend(test_module_files(src, path, &lexed));
        scanned.push((module, path, lexed));
    }
    for (module, path, lexed) in scanned {
        let relative = path.strip_prefix(src).unwrap_or(path).to_path_buf();
        let in_tests_folder = relative.components().any(|c| c.as_os_str() == "tests");
        if in_tests_folder || relative.ends_with("tests.rs") || test_only.contains(path) {
            continue;
        }
        let depth = relative.components().count()
            - usize::from(relative.file_name().is_some_and(|n| n == "mod.rs"));
        for (named, line) in root_names(&lexed, depth) {
            if named != *module && graph.modules.contains(&named) {
                graph
                    .edges
                    .entry(module.clone())
                    .or_default()
                    .entry(named)
                    .or_default()
                    .push(Mention {
                        file: relative.clone(),
                        line,
                    });
            }
        }
    }
    Ok(graph)
}

fn rust_files(dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs_err::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            out.extend(rust_files(&path)?);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    Ok(out)
}

/// What a byte of source is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Code,
    Doc,
    Skipped,
}

/// A file's text with each byte classified and the test items marked.
struct Lexed {
    text: Vec<u8>,
    kind: Vec<Kind>,
    in_test: Vec<bool>,
    /// `#[cfg(test)] mod name;` declarations.
    test_mods: Vec<String>,
}

fn scan(text: &str) -> Lexed {
    let b = text.as_bytes();
    let mut kind = vec![Kind::Code; b.len()];
    let mut i = 0;
    while i < b.len() {
        let rest = &b[i..];
        let start = i;
        if rest.starts_with(b"//") {
            let doc = rest.starts_with(b"///") || rest.starts_with(b"//!");
            while i < b.len() && b[i] != b'\n' {
                i += 1;
            }
            let k = if doc { Kind::Doc } else { Kind::Skipped };
            kind[start..i].fill(k);
        } else if rest.starts_with(b"/*") {
            let mut depth = 0;
            while i < b.len() {
                if b[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if b[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            kind[start..i.min(b.len())].fill(Kind::Skipped);
        } else if let Some(hashes) = raw_string_start(rest) {
            i += hashes + 2;
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            while i < b.len() && !b[i..].starts_with(&close) {
                i += 1;
            }
            i = (i + close.len()).min(b.len());
            kind[start..i].fill(Kind::Skipped);
        } else if b[i] == b'"' {
            i += 1;
            while i < b.len() && b[i] != b'"' {
                i += if b[i] == b'\\' { 2 } else { 1 };
            }
            i = (i + 1).min(b.len());
            kind[start..i].fill(Kind::Skipped);
        } else if b[i] == b'\'' && char_literal_len(rest).is_some() {
            i += char_literal_len(rest).unwrap_or(1);
            kind[start..i].fill(Kind::Skipped);
        } else {
            i += 1;
        }
    }
    let (in_test, test_mods) = test_items(b, &kind);
    Lexed {
        text: b.to_vec(),
        kind,
        in_test,
        test_mods,
    }
}

/// `r"`, `r#"`, `br##"`…: the number of `#`.
fn raw_string_start(rest: &[u8]) -> Option<usize> {
    let after_b = rest.strip_prefix(b"b").unwrap_or(rest);
    let after_r = after_b.strip_prefix(b"r")?;
    let hashes = after_r.iter().take_while(|&&c| c == b'#').count();
    (after_r.get(hashes) == Some(&b'"')).then_some(hashes)
}

/// The length of a char literal at the start of `rest` (not a lifetime).
fn char_literal_len(rest: &[u8]) -> Option<usize> {
    if rest.get(1) == Some(&b'\\') {
        let end = rest.iter().skip(2).position(|&c| c == b'\'')?;
        return Some(end + 3);
    }
    let text = std::str::from_utf8(&rest[1..rest.len().min(6)]).unwrap_or_default();
    let ch = text.chars().next()?;
    let after = 1 + ch.len_utf8();
    (rest.get(after) == Some(&b'\'')).then_some(after + 1)
}

/// Marks every item under `#[cfg(test)]` (a module block, a function, a
/// `use`…) as test code; answers those marks and the names of the
/// `#[cfg(test)] mod name;` declarations.
fn test_items(b: &[u8], kind: &[Kind]) -> (Vec<bool>, Vec<String>) {
    const ATTRIBUTE: &[u8] = b"#[cfg(test)]";
    let mut in_test = vec![false; b.len()];
    let mut test_mods = Vec::new();
    let mut i = 0;
    while i + ATTRIBUTE.len() <= b.len() {
        if !(b[i..].starts_with(ATTRIBUTE) && kind[i] == Kind::Code) {
            i += 1;
            continue;
        }
        let start = i;
        let mut j = i + ATTRIBUTE.len();
        let item_start = j;
        let mut depth = 0usize;
        while j < b.len() {
            if kind[j] == Kind::Code {
                match b[j] {
                    b'{' => depth += 1,
                    b'}' => {
                        depth = depth.saturating_sub(1);
                        if depth == 0 {
                            j += 1;
                            break;
                        }
                    }
                    b';' if depth == 0 => {
                        j += 1;
                        break;
                    }
                    _ => {}
                }
            }
            j += 1;
        }
        let item = String::from_utf8_lossy(&b[item_start..j]);
        let words: Vec<&str> = item
            .split(|c: char| !(c.is_alphanumeric() || c == '_'))
            .filter(|w| !w.is_empty())
            .collect();
        if item.trim_end().ends_with(';')
            && let Some(at) = words.iter().position(|w| *w == "mod")
            && let Some(name) = words.get(at + 1)
        {
            test_mods.push((*name).to_owned());
        }
        in_test[start..j].fill(true);
        i = j;
    }
    (in_test, test_mods)
}

/// The files of the modules `path` declares as `#[cfg(test)] mod name;`.
fn test_module_files(src: &Path, path: &Path, lexed: &Lexed) -> Vec<PathBuf> {
    let file_name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let dir = if matches!(file_name, "mod.rs" | "main.rs" | "lib.rs") {
        path.parent().unwrap_or(src).to_path_buf()
    } else {
        path.with_extension("")
    };
    let mut out = Vec::new();
    for name in &lexed.test_mods {
        let file = dir.join(format!("{name}.rs"));
        let folder = dir.join(name);
        out.push(file);
        if folder.is_dir() {
            out.extend(rust_files(&folder).unwrap_or_default());
        }
    }
    out
}

/// The first segments of the paths, outside test code, that start at the
/// crate root (`crate::x`, `crate::{x, y}`, and `super::` repeated `depth`
/// times), with their lines.
fn root_names(lexed: &Lexed, depth: usize) -> Vec<(String, usize)> {
    let b = &lexed.text[..];
    let counted = |i: usize| lexed.kind[i] != Kind::Skipped && !lexed.in_test[i];
    let line_of = |i: usize| 1 + b[..i].iter().filter(|&&c| c == b'\n').count();
    let ident_at = |i: usize| {
        let end = b[i..]
            .iter()
            .position(|c| !(c.is_ascii_alphanumeric() || *c == b'_'))
            .map_or(b.len(), |n| i + n);
        String::from_utf8_lossy(&b[i..end]).into_owned()
    };
    let word_start = |i: usize| i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if !counted(i) || !word_start(i) || (i >= 2 && &b[i - 2..i] == b"::") {
            i += 1;
            continue;
        }
        let mut j = i;
        if b[i..].starts_with(b"crate::") {
            j += "crate::".len();
        } else if depth > 0 && b[i..].starts_with(b"super::") {
            let mut climbs = 0;
            while b[j..].starts_with(b"super::") {
                climbs += 1;
                j += "super::".len();
            }
            if climbs != depth {
                i = j;
                continue;
            }
        } else {
            i += 1;
            continue;
        }
        if b.get(j) == Some(&b'{') {
            // A group: the first segment of each of its paths.
            let mut level = 0usize;
            let mut expect_name = true;
            let mut k = j;
            while k < b.len() {
                match b[k] {
                    b'{' => {
                        level += 1;
                        expect_name = level == 1;
                    }
                    b'}' => {
                        level -= 1;
                        if level == 0 {
                            break;
                        }
                    }
                    b',' if level == 1 => expect_name = true,
                    c if expect_name && level == 1 && (c.is_ascii_alphabetic() || c == b'_') => {
                        out.push((ident_at(k), line_of(k)));
                        expect_name = false;
                    }
                    _ => {}
                }
                k += 1;
            }
            i = k;
        } else {
            let name = ident_at(j);
            if !name.is_empty() {
                out.push((name, line_of(i)));
            }
            i = j;
        }
    }
    out
}

/// The import cycles: one per strongly connected group of modules, the
/// shortest cycle through its first module.
pub fn cycles(graph: &ModuleGraph) -> Vec<Cycle> {
    let next = |m: &str| -> Vec<String> {
        graph
            .edges
            .get(m)
            .map(|to| to.keys().cloned().collect())
            .unwrap_or_default()
    };
    let reaches = |from: &str| -> BTreeSet<String> {
        let mut seen = BTreeSet::new();
        let mut queue: VecDeque<String> = next(from).into();
        while let Some(m) = queue.pop_front() {
            if seen.insert(m.clone()) {
                queue.extend(next(&m));
            }
        }
        seen
    };
    let reach: BTreeMap<&String, BTreeSet<String>> =
        graph.modules.iter().map(|m| (m, reaches(m))).collect();
    let mut placed = BTreeSet::new();
    let mut out = Vec::new();
    for m in &graph.modules {
        if placed.contains(m) || !reach[m].contains(m) {
            continue;
        }
        let group: BTreeSet<&String> = graph
            .modules
            .iter()
            .filter(|o| reach[m].contains(*o) && reach[*o].contains(m))
            .collect();
        placed.extend(group.iter().map(|s| (*s).clone()));
        // Breadth-first from m back to m, inside the group.
        let mut parent: BTreeMap<String, String> = BTreeMap::new();
        let mut queue = VecDeque::from([m.clone()]);
        'search: while let Some(at) = queue.pop_front() {
            for to in next(&at) {
                if !group.contains(&to) || parent.contains_key(&to) {
                    continue;
                }
                parent.insert(to.clone(), at.clone());
                if to == *m {
                    break 'search;
                }
                queue.push_back(to);
            }
        }
        let mut path = vec![m.clone()];
        let mut at = parent[m].clone();
        while at != *m {
            path.push(at.clone());
            at = parent[&at].clone();
        }
        path.reverse();
        path.rotate_right(1);
        let edges = (0..path.len())
            .map(|k| {
                let (from, to) = (&path[k], &path[(k + 1) % path.len()]);
                (from.clone(), to.clone(), graph.edges[from][to].clone())
            })
            .collect();
        out.push(Cycle { path, edges });
    }
    out
}

/// The cycles of the crate in `src`, told for a person (empty: none).
pub fn report(src: &Path) -> anyhow::Result<String> {
    let graph = module_graph(src)?;
    anyhow::ensure!(
        !graph.modules.is_empty(),
        "no modules found in {}",
        src.display()
    );
    let mut text = String::new();
    for cycle in cycles(&graph) {
        let mut ring = cycle.path.clone();
        ring.push(cycle.path[0].clone());
        let _ = writeln!(
            text,
            "{}: import cycle {}",
            src.display(),
            ring.join(" -> ")
        );
        for (from, to, mentions) in &cycle.edges {
            let _ = writeln!(text, "  {from} -> {to}:");
            for mention in mentions {
                let file = src.join(&mention.file);
                let _ = writeln!(text, "    {}:{}", file.display(), mention.line);
            }
        }
    }
    Ok(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn crate_of(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        for (path, text) in files {
            let path = dir.path().join(path);
            fs_err::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            fs_err::write(path, text).expect("write");
        }
        dir
    }

    #[test]
    fn a_cycle_is_named_with_the_line_of_each_edge() {
        let dir = crate_of(&[
            ("main.rs", "mod a;\nmod b;\nmod c;\n"),
            ("a.rs", "//! A.\n\nuse crate::b::Thing;\n"),
            ("b/mod.rs", "mod inner;\n"),
            (
                "b/inner.rs",
                "fn f() {}\n\nfn g() { super::super::c::h(); }\n",
            ),
            ("c.rs", "use crate::{\n    a::{self, X},\n    d,\n};\n"),
        ]);
        let text = report(dir.path()).expect("report");
        assert!(text.contains("import cycle a -> b -> c -> a"), "{text}");
        assert!(text.contains("a.rs:3"), "{text}");
        assert!(text.contains("inner.rs:3"), "{text}");
        assert!(text.contains("c.rs:2"), "{text}");
    }

    #[test]
    fn test_code_comments_and_strings_make_no_edge() {
        let dir = crate_of(&[
            ("main.rs", "mod a;\nmod b;\n#[cfg(test)]\nmod fixtures;\n"),
            ("a.rs", "use crate::b::B;\n"),
            (
                "b/mod.rs",
                "// crate::a in a comment\nconst S: &str = \"crate::a\";\nconst C: char = '{';\n\
                 #[cfg(test)]\nuse crate::a::A;\n#[cfg(test)]\nmod tests {\n    use crate::a;\n    \
                 fn f() { let _ = \"}\"; crate::a::g(); }\n}\n#[cfg(test)]\nmod harness;\n",
            ),
            ("b/tests.rs", "use crate::a::A;\n"),
            ("b/harness.rs", "use crate::a::A;\n"),
            ("fixtures.rs", "use crate::a::A;\n"),
        ]);
        let graph = module_graph(dir.path()).expect("graph");
        assert!(cycles(&graph).is_empty(), "{:?}", graph.edges);
        assert_eq!(graph.edges["a"].keys().collect::<Vec<_>>(), ["b"]);
        assert!(!graph.edges.contains_key("b"), "{:?}", graph.edges);
    }

    #[test]
    fn product_code_after_a_test_item_still_counts() {
        let dir = crate_of(&[
            ("main.rs", "mod a;\nmod b;\n"),
            ("a.rs", "use crate::b::B;\n"),
            (
                "b.rs",
                "#[cfg(test)]\nfn only_in_tests() { crate::a::x(); }\n\npub fn real() { crate::a::y(); }\n",
            ),
        ]);
        let text = report(dir.path()).expect("report");
        assert!(text.contains("b -> a:\n"), "{text}");
        assert!(text.contains("b.rs:4"), "{text}");
        assert!(!text.contains("b.rs:2"), "{text}");
    }
}
