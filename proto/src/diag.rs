//! Config diagnostics: load a TOML file into a serde type and report every error at
//! once, each located by file, line, column and key path; callers add semantic errors
//! located by key path.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml::de::{DeTable, DeValue};

/// How many recoveries one load attempts before giving up on finding more errors.
const MAX_RECOVERIES: usize = 200;

/// One step of a key path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Segment {
    Key(String),
    Index(usize),
}

fn format_path(segments: &[Segment]) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            Segment::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Segment::Index(index) => out.push_str(&format!("[{index}]")),
        }
    }
    out
}

/// Parses `availability.schedule[0].days` into segments.
fn parse_path(path: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, mut rest) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            segments.push(Segment::Key(key.to_owned()));
        }
        while let Some(stripped) = rest.strip_prefix('[') {
            let Some(end) = stripped.find(']') else { break };
            match stripped[..end].parse() {
                Ok(index) => segments.push(Segment::Index(index)),
                Err(_) => segments.push(Segment::Key(stripped[..end].to_owned())),
            }
            rest = &stripped[end + 1..];
        }
    }
    segments
}

/// Where each key and value sits in the file: byte ranges by key path.
#[derive(Debug, Clone, Default)]
struct Locator {
    text: String,
    /// Key path → (span of the key, span of the value).
    spans: HashMap<String, (Option<Range<usize>>, Range<usize>)>,
}

impl Locator {
    fn new(text: &str, root: Option<&DeTable<'_>>) -> Locator {
        let mut locator = Locator {
            text: text.to_owned(),
            spans: HashMap::new(),
        };
        if let Some(root) = root {
            locator.index_table(&mut Vec::new(), root);
        }
        locator
    }

    fn index_table(&mut self, prefix: &mut Vec<Segment>, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            prefix.push(Segment::Key(key.get_ref().to_string()));
            self.spans
                .insert(format_path(prefix), (Some(key.span()), value.span()));
            self.index_value(prefix, value.get_ref());
            prefix.pop();
        }
    }

    fn index_value(&mut self, prefix: &mut Vec<Segment>, value: &DeValue<'_>) {
        match value {
            DeValue::Table(table) => self.index_table(prefix, table),
            DeValue::Array(array) => {
                for (index, item) in array.iter().enumerate() {
                    prefix.push(Segment::Index(index));
                    self.spans.insert(format_path(prefix), (None, item.span()));
                    self.index_value(prefix, item.get_ref());
                    prefix.pop();
                }
            }
            _ => {}
        }
    }

    /// Line and column (1-based, columns in characters) of a byte offset.
    fn line_column(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let mut safe = offset;
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let before = &self.text[..safe];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |at| at + 1);
        let column = before[line_start..].chars().count() + 1;
        (line, column)
    }

    /// The position of a key path: its value (or its key when `at_key`), else
    /// the nearest enclosing key that exists in the file.
    fn locate(&self, segments: &[Segment], at_key: bool) -> Option<(usize, usize)> {
        let mut length = segments.len();
        let mut prefer_key = at_key;
        loop {
            if length == 0 {
                return None;
            }
            if let Some((key, value)) = self.spans.get(&format_path(&segments[..length])) {
                let span = match (prefer_key, key) {
                    (true, Some(key)) => key.clone(),
                    _ => value.clone(),
                };
                return Some(self.line_column(span.start));
            }
            length -= 1;
            // For a missing key, point at the table that should hold it.
            prefer_key = true;
        }
    }
}

/// One located problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based line and column, when the problem has a place in the file.
    pub line_column: Option<(usize, usize)>,
    /// The key path, e.g. `availability.schedule[0].days`; empty for the whole file.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.line_column {
            write!(f, ":{line}:{column}")?;
        }
        if self.path.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in one config file, printed one per line as
/// `worker.toml:12:9: availability.schedule[0].days: unknown day "mnd", expected mon..sun`.
#[derive(Debug, Clone)]
pub struct ConfigErrors {
    file: PathBuf,
    errors: Vec<ConfigError>,
    document: Box<DocumentContext>,
}

/// What locates a key path in the file.
#[derive(Debug, Clone, Default)]
struct DocumentContext {
    locator: Locator,
    /// Array entries left out of the value handed to validation (by array
    /// path, file indices), so that paths into that value are reported at the
    /// indices the user wrote.
    removed: HashMap<String, Vec<usize>>,
}

impl ConfigErrors {
    /// An empty collection for `file` (errors get no line/column until a
    /// document is known).
    pub fn new(file: impl Into<PathBuf>) -> ConfigErrors {
        ConfigErrors {
            file: file.into(),
            errors: Vec::new(),
            document: Box::default(),
        }
    }

    /// The file these errors are about.
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Adds a problem about the value at a key path (e.g.
    /// `availability.schedule[1].days`) of the deserialized value, located in
    /// the file. A problem at a path that already has one (or inside it) is
    /// not repeated.
    pub fn push_at_path(&mut self, path: &str, message: impl Into<String>) {
        let original = to_original(&parse_path(path), &self.document.removed);
        self.push_segments(&original, false, message.into());
    }

    /// Adds a problem about a key itself (an unknown or misplaced key).
    pub fn push_at_key(&mut self, path: &str, message: impl Into<String>) {
        let original = to_original(&parse_path(path), &self.document.removed);
        self.push_segments(&original, true, message.into());
    }

    /// Adds a problem about the whole file (no line, no key).
    pub fn push(&mut self, message: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line_column: None,
            path: String::new(),
            message: message.into(),
        });
    }

    fn push_segments(&mut self, segments: &[Segment], at_key: bool, message: String) {
        let path = format_path(segments);
        if self.covers(&path) {
            return;
        }
        self.errors.push(ConfigError {
            file: self.file.clone(),
            line_column: self.document.locator.locate(segments, at_key),
            path,
            message,
        });
    }

    /// Whether a problem is already reported at `path`, at a key inside it,
    /// or at a key that contains it.
    fn covers(&self, path: &str) -> bool {
        let nested = |outer: &str, inner: &str| {
            inner == outer
                || (inner.starts_with(outer)
                    && (inner[outer.len()..].starts_with('.')
                        || inner[outer.len()..].starts_with('[')))
        };
        !path.is_empty()
            && self
                .errors
                .iter()
                .any(|e| !e.path.is_empty() && (nested(&e.path, path) || nested(path, &e.path)))
    }

    pub fn is_empty(&self) -> bool {
        self.errors.is_empty()
    }

    pub fn len(&self) -> usize {
        self.errors.len()
    }

    pub fn errors(&self) -> &[ConfigError] {
        &self.errors
    }

    /// `Ok(value)` when no problem was found, else these errors in file order.
    pub fn into_result<T>(mut self, value: T) -> Result<T, ConfigErrors> {
        if self.errors.is_empty() {
            Ok(value)
        } else {
            self.sort();
            Err(self)
        }
    }

    /// Orders the errors as they appear in the file (errors without a place last).
    pub fn sort(&mut self) {
        self.errors
            .sort_by_key(|e| (e.line_column.is_none(), e.line_column));
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, error) in self.errors.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// Reads and deserializes a TOML file, reporting every error at once.
pub fn load_toml<T: DeserializeOwned>(path: &Path) -> Result<T, ConfigErrors> {
    load_toml_validated(path, |_, _| {})
}

/// Reads and deserializes a TOML file, then runs `validate` for semantic
/// checks (which add errors with [`ConfigErrors::push_at_path`]). Parse and
/// semantic errors are reported together; a semantic error at a key that
/// already has a parse error is dropped.
pub fn load_toml_validated<T: DeserializeOwned>(
    path: &Path,
    validate: impl FnOnce(&T, &mut ConfigErrors),
) -> Result<T, ConfigErrors> {
    let text = match fs_err::read_to_string(path) {
        Ok(text) => text,
        Err(error) => {
            let mut errors = ConfigErrors::new(path);
            errors.push(format!("cannot read the config file: {error}"));
            return Err(errors);
        }
    };
    parse_toml_validated(path, &text, validate)
}

/// Like [`load_toml_validated`] for text already read; `file` names it in errors.
pub fn parse_toml_validated<T: DeserializeOwned>(
    file: &Path,
    text: &str,
    validate: impl FnOnce(&T, &mut ConfigErrors),
) -> Result<T, ConfigErrors> {
    let (value, mut errors) = parse_toml(file, text);
    match value {
        Some(value) => {
            validate(&value, &mut errors);
            errors.into_result(value)
        }
        None => Err(errors),
    }
}

/// Deserializes `text` as far as possible: the value (built with the bad
/// parts left out, so defaults stand in for them) when the document's shape
/// allows one, and every error found. Use the value only for further
/// validation when errors is non-empty.
pub fn parse_toml<T: DeserializeOwned>(file: &Path, text: &str) -> (Option<T>, ConfigErrors) {
    let (document, syntax_errors) = DeTable::parse_recoverable(text);
    let mut errors = ConfigErrors {
        file: file.to_owned(),
        errors: Vec::new(),
        document: Box::new(DocumentContext {
            locator: Locator::new(text, Some(document.get_ref())),
            removed: HashMap::new(),
        }),
    };
    if !syntax_errors.is_empty() {
        for error in syntax_errors {
            let line_column = error
                .span()
                .map(|span| errors.document.locator.line_column(span.start));
            // One report per line: the parser's follow-on complaints add nothing.
            let same_line = |e: &ConfigError| {
                e.line_column.map(|(line, _)| line) == line_column.map(|(line, _)| line)
            };
            if errors.errors.iter().any(same_line) {
                continue;
            }
            let mut message = first_line(error.message());
            if message == "duplicate key"
                && let Some(key) = error.span().and_then(|span| text.get(span))
            {
                message = format!("duplicate key `{}`", key.trim());
            }
            errors.errors.push(ConfigError {
                file: file.to_owned(),
                line_column,
                path: String::new(),
                message,
            });
        }
        return (None, errors);
    }
    let mut table: toml::Table = match toml::from_str(text) {
        Ok(table) => table,
        Err(error) => {
            let line_column = error
                .span()
                .map(|span| errors.document.locator.line_column(span.start));
            errors.errors.push(ConfigError {
                file: file.to_owned(),
                line_column,
                path: String::new(),
                message: first_line(error.message()),
            });
            return (None, errors);
        }
    };
    // Indices removed from each array (original coordinates), to report later
    // errors at the indices the user wrote.
    let mut removed: HashMap<String, Vec<usize>> = HashMap::new();
    for _ in 0..MAX_RECOVERIES {
        let error = match serde_path_to_error::deserialize::<_, T>(table.clone()) {
            Ok(value) => {
                errors.sort();
                errors.document.removed = removed;
                return (Some(value), errors);
            }
            Err(error) => error,
        };
        let current: Vec<Segment> = error
            .path()
            .iter()
            .filter_map(|segment| match segment {
                serde_path_to_error::Segment::Seq { index } => Some(Segment::Index(*index)),
                serde_path_to_error::Segment::Map { key } => Some(Segment::Key(key.clone())),
                serde_path_to_error::Segment::Enum { .. }
                | serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        let message = error.inner().message().to_owned();
        let original = to_original(&current, &removed);
        let (kind, message) = classify(&message);
        match kind {
            ErrorKind::Missing(key) => {
                let mut missing = original.clone();
                missing.push(Segment::Key(key));
                errors.push_segments(&missing, true, message);
                // Leave out the table that lacks the key, to look for more.
                if current.is_empty() || !remove(&mut table, &current, &original, &mut removed) {
                    errors.sort();
                    return (None, errors);
                }
            }
            ErrorKind::UnknownKey => {
                errors.push_segments(&original, true, message);
                if current.is_empty() || !remove(&mut table, &current, &original, &mut removed) {
                    errors.sort();
                    return (None, errors);
                }
            }
            ErrorKind::Value => {
                errors.push_segments(&original, false, message);
                if current.is_empty() || !remove(&mut table, &current, &original, &mut removed) {
                    errors.sort();
                    return (None, errors);
                }
            }
        }
    }
    errors.push("too many errors; fix these and check again");
    errors.sort();
    (None, errors)
}

enum ErrorKind {
    Missing(String),
    UnknownKey,
    Value,
}

/// Sorts a serde message and rewrites it in the config's words.
fn classify(message: &str) -> (ErrorKind, String) {
    let message = first_line(message);
    if let Some(rest) = message.strip_prefix("missing field `")
        && let Some(key) = rest.split('`').next()
    {
        return (
            ErrorKind::Missing(key.to_owned()),
            format!("missing required key `{key}`"),
        );
    }
    if let Some(rest) = message.strip_prefix("unknown field `") {
        return (ErrorKind::UnknownKey, format!("unknown key `{rest}"));
    }
    if let Some(rest) = message.strip_prefix("unknown variant `") {
        return (ErrorKind::Value, format!("unknown value `{rest}"));
    }
    (ErrorKind::Value, plain_types(&message))
}

/// Says `a number` where serde says `f64`, `a whole number` for `u32`, etc.
fn plain_types(message: &str) -> String {
    let mut out = message.to_owned();
    for (rust, plain) in [
        ("expected f64", "expected a number"),
        ("expected f32", "expected a number"),
        ("expected u8", "expected a whole number"),
        ("expected u16", "expected a whole number"),
        ("expected u32", "expected a whole number"),
        ("expected u64", "expected a whole number"),
        ("expected usize", "expected a whole number"),
        ("expected i32", "expected a whole number"),
        ("expected i64", "expected a whole number"),
        ("expected a sequence", "expected an array"),
        ("expected a map", "expected a table"),
    ] {
        if let Some(rest) = out.strip_suffix(rust) {
            out = format!("{rest}{plain}");
        }
    }
    out
}

fn first_line(message: &str) -> String {
    message
        .trim()
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .to_owned()
}

/// Translates a path in the pruned document back to the indices in the file.
fn to_original(current: &[Segment], removed: &HashMap<String, Vec<usize>>) -> Vec<Segment> {
    let mut original: Vec<Segment> = Vec::with_capacity(current.len());
    for segment in current {
        match segment {
            Segment::Index(index) => {
                let mut index = *index;
                if let Some(gone) = removed.get(&format_path(&original)) {
                    let mut sorted = gone.clone();
                    sorted.sort_unstable();
                    for gone_index in sorted {
                        if gone_index <= index {
                            index += 1;
                        }
                    }
                }
                original.push(Segment::Index(index));
            }
            key => original.push(key.clone()),
        }
    }
    original
}

/// Removes the item at `current` from the pruned document; returns whether
/// anything was removed.
fn remove(
    table: &mut toml::Table,
    current: &[Segment],
    original: &[Segment],
    removed: &mut HashMap<String, Vec<usize>>,
) -> bool {
    let Some((last, parents)) = current.split_last() else {
        return false;
    };
    let mut container: Option<&mut toml::Value> = None;
    let mut root: Option<&mut toml::Table> = Some(table);
    for segment in parents {
        let next = match (container.take(), root.take(), segment) {
            (None, Some(root), Segment::Key(key)) => root.get_mut(key),
            (Some(toml::Value::Table(t)), None, Segment::Key(key)) => t.get_mut(key),
            (Some(toml::Value::Array(a)), None, Segment::Index(i)) => a.get_mut(*i),
            _ => None,
        };
        match next {
            Some(value) => container = Some(value),
            None => return false,
        }
    }
    match (container, root, last) {
        (None, Some(root), Segment::Key(key)) => root.remove(key).is_some(),
        (Some(toml::Value::Table(t)), None, Segment::Key(key)) => t.remove(key).is_some(),
        (Some(toml::Value::Array(a)), None, Segment::Index(i)) if *i < a.len() => {
            a.remove(*i);
            if let Some(Segment::Index(original_index)) = original.last() {
                removed
                    .entry(format_path(&original[..original.len() - 1]))
                    .or_default()
                    .push(*original_index);
            }
            true
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Config {
        name: String,
        #[serde(default)]
        max_builds: u32,
        #[serde(default)]
        section: Section,
        #[serde(default)]
        entry: Vec<Entry>,
    }

    #[derive(Debug, Default, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Section {
        #[serde(default)]
        level: u32,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Fast,
        Slow,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Entry {
        name: String,
        #[serde(default)]
        size: u32,
    }

    fn errors_of(text: &str) -> Vec<String> {
        let (value, errors) = parse_toml::<Config>(Path::new("t.toml"), text);
        let _ = value;
        errors.errors().iter().map(|e| e.to_string()).collect()
    }

    #[test]
    fn reports_every_error_with_line_column_and_key() {
        let text = "name = \"w\"\nmax_bulds = 2\n\n[section]\nlevel = \"high\"\nmode = \"medium\"\n\n[[entry]]\nname = \"a\"\nsise = 3\n\n[[entry]]\nsize = 4\n\n[[entry]]\nname = \"c\"\nsize = -1\n";
        let errors = errors_of(text);
        assert_eq!(
            errors,
            vec![
                "t.toml:2:1: max_bulds: unknown key `max_bulds`, expected one of `name`, `max_builds`, `section`, `entry`",
                "t.toml:5:9: section.level: invalid type: string \"high\", expected a whole number",
                "t.toml:6:8: section.mode: unknown value `medium`, expected `fast` or `slow`",
                "t.toml:10:1: entry[0].sise: unknown key `sise`, expected `name` or `size`",
                "t.toml:12:1: entry[1].name: missing required key `name`",
                "t.toml:17:8: entry[2].size: invalid value: integer `-1`, expected a whole number",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let errors = errors_of("name = \"w\"\nmax_builds = = 3\n");
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("t.toml:2:"), "{errors:?}");
    }

    #[test]
    fn missing_root_key_is_reported() {
        let errors = errors_of("max_builds = 1\n");
        assert_eq!(errors, vec!["t.toml: name: missing required key `name`"]);
    }

    #[test]
    fn semantic_errors_join_parse_errors_without_repeats() {
        let text = "name = \"w\"\nmax_builds = \"x\"\n[section]\nlevel = 7\n";
        let result = parse_toml_validated::<Config>(Path::new("t.toml"), text, |cfg, errors| {
            assert_eq!(cfg.max_builds, 0, "the bad value is left out");
            errors.push_at_path("max_builds", "must be at least 1");
            errors.push_at_path("section.level", "must be at most 5");
            errors.push_at_path("section.missing", "is needed");
        });
        let errors = result.unwrap_err().to_string();
        assert_eq!(
            errors,
            "t.toml:2:14: max_builds: invalid type: string \"x\", expected a whole number\n\
             t.toml:3:2: section.missing: is needed\n\
             t.toml:4:9: section.level: must be at most 5"
        );
    }

    #[test]
    fn semantic_paths_keep_the_file_indices_after_a_left_out_entry() {
        let text = "name = \"w\"\n[[entry]]\nsize = 1\n[[entry]]\nname = \"b\"\nsize = 99\n";
        let result = parse_toml_validated::<Config>(Path::new("t.toml"), text, |cfg, errors| {
            assert_eq!(cfg.entry.len(), 1, "the entry without a name is left out");
            errors.push_at_path("entry[0].size", "too big");
        });
        assert_eq!(
            result.unwrap_err().to_string(),
            "t.toml:2:1: entry[0].name: missing required key `name`\nt.toml:6:8: entry[1].size: too big"
        );
    }

    #[test]
    fn duplicate_keys_are_named() {
        let errors = errors_of("name = \"w\"\nname = \"v\"\n");
        assert_eq!(errors, vec!["t.toml:2:1: duplicate key `name`"]);
    }

    #[test]
    fn unreadable_file_is_an_error() {
        let error = load_toml::<Config>(Path::new("/nonexistent/nightshift.toml")).unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("/nonexistent/nightshift.toml: cannot read")
        );
    }

    #[test]
    fn paths_round_trip() {
        for path in ["a", "a.b[0].c", "worker[2].schedule[10]"] {
            assert_eq!(format_path(&parse_path(path)), path);
        }
    }
}
