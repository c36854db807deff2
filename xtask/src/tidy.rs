//! The house rules of STYLE.md as a checker over source text: every module opens with a `//!` header;
//! no test is hidden (`#[ignore]`, `#[should_panic]`, `ignore`/`should_panic` doctests); no `todo!` or
//! `unimplemented!` calls; every `unsafe` block has a `// SAFETY:` comment just above it.
//!
//! The checks are line-based, not a parser: the attribute and macro rules skip comment lines (prose may
//! name what it forbids), and the SAFETY rule looks at the 3 lines above the block or, for a longer
//! argument, the whole comment block that ends right above it. The patterns below are spelled in pieces
//! so that this file does not trip its own rules. `tests/tidy.rs` runs [`check_tree`] on the repository.

use std::fmt;
use std::path::{Path, PathBuf};

/// Directories below the repository root whose `.rs` files are checked.
pub const ROOTS: &[&str] = &["crates", "xtask", "examples", "compat"];

const IGNORE_ATTR: &str = concat!("#[", "ignore");
const SHOULD_PANIC_ATTR: &str = concat!("#[", "should_panic");
const TODO_MACRO: &str = concat!("todo", "!(");
const UNIMPLEMENTED_MACRO: &str = concat!("unimplemented", "!(");
const UNSAFE_BLOCK: &str = concat!("unsafe", " {");
const SAFETY_COMMENT: &str = "// SAFETY:";
/// How many lines above an `unsafe` block the SAFETY comment may start.
const SAFETY_WINDOW: usize = 3;

/// One broken rule at one place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offence {
    /// The file, relative to the checked root when found by [`check_tree`].
    pub path: PathBuf,
    /// 1-based line number.
    pub line: usize,
    /// Which rule, in a few words.
    pub rule: &'static str,
}

impl fmt::Display for Offence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.path.display(), self.line, self.rule)
    }
}

/// Every `.rs` file below the [`ROOTS`] of `root`, sorted, skipping `target` and hidden directories.
///
/// # Errors
/// If a directory cannot be read.
pub fn rust_files(root: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for dir in ROOTS {
        let dir = root.join(dir);
        if dir.is_dir() {
            walk(&dir, &mut files)?;
        }
    }
    files.sort();
    Ok(files)
}

fn walk(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if entry.file_type()?.is_dir() {
            if name != "target" && !name.starts_with('.') {
                walk(&path, files)?;
            }
        } else if name.ends_with(".rs") {
            files.push(path);
        }
    }
    Ok(())
}

/// Checks every file [`rust_files`] finds below `root`; offences carry paths relative to `root`.
///
/// # Errors
/// If a directory or file cannot be read.
pub fn check_tree(root: &Path) -> std::io::Result<(usize, Vec<Offence>)> {
    let files = rust_files(root)?;
    let mut offences = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file)?;
        let relative = file.strip_prefix(root).unwrap_or(file);
        offences.extend(check_source(relative, &text));
    }
    Ok((files.len(), offences))
}

/// Checks one file's text against every rule.
#[must_use]
pub fn check_source(path: &Path, text: &str) -> Vec<Offence> {
    let lines: Vec<&str> = text.lines().collect();
    let mut offences = Vec::new();
    let mut offend = |line: usize, rule| offences.push(Offence { path: path.to_path_buf(), line, rule });

    match lines.iter().position(|l| !l.trim().is_empty()) {
        Some(i) if lines[i].trim_start().starts_with("//!") => {}
        Some(i) => offend(i + 1, "module does not open with a `//!` header"),
        None => offend(1, "empty file: a module needs a `//!` header"),
    }

    for (i, raw) in lines.iter().enumerate() {
        let line = raw.trim_start();
        if let Some(doc) = line.strip_prefix("///").or_else(|| line.strip_prefix("//!")) {
            if is_hidden_doctest_fence(doc) {
                offend(i + 1, "doctest fence hides the test (`ignore` or `should_panic`)");
            }
            continue;
        }
        if line.starts_with("//") {
            continue;
        }
        if line.contains(IGNORE_ATTR) {
            offend(i + 1, "ignored test: assert today's behaviour and add a FIXME instead");
        }
        if line.contains(SHOULD_PANIC_ATTR) {
            offend(i + 1, "should_panic test: assert on a Result or catch_unwind instead");
        }
        if line.contains(TODO_MACRO) || line.contains(UNIMPLEMENTED_MACRO) {
            offend(i + 1, "todo/unimplemented macro: file an issue and return an error instead");
        }
        if line.contains(UNSAFE_BLOCK) && !has_safety_comment(&lines, i) {
            offend(i + 1, "unsafe block without a `// SAFETY:` comment in the 3 lines above");
        }
    }
    offences
}

/// Whether a doc line (after its `///` or `//!`) opens a code fence whose info string hides the test.
fn is_hidden_doctest_fence(doc: &str) -> bool {
    let Some(info) = doc.trim_start().strip_prefix("```") else {
        return false;
    };
    info.split([',', ' ']).any(|word| matches!(word.trim(), "ignore" | "should_panic"))
}

/// Whether a `// SAFETY:` comment starts within [`SAFETY_WINDOW`] lines above line `at`, or anywhere
/// in the run of comment lines that ends right above it.
fn has_safety_comment(lines: &[&str], at: usize) -> bool {
    let window = &lines[at.saturating_sub(SAFETY_WINDOW)..at];
    if window.iter().any(|l| l.contains(SAFETY_COMMENT)) {
        return true;
    }
    lines[..at]
        .iter()
        .rev()
        .take_while(|l| l.trim_start().starts_with("//"))
        .any(|l| l.contains(SAFETY_COMMENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Vec<(usize, &'static str)> {
        check_source(Path::new("t.rs"), text).into_iter().map(|o| (o.line, o.rule)).collect()
    }

    fn lines_of(text: &str) -> Vec<usize> {
        rules(text).into_iter().map(|(line, _)| line).collect()
    }

    #[test]
    fn tidy_clean_module_passes() {
        let text = format!(
            "//! A module.\n\nfn f() {{\n    // SAFETY: the pointer is valid.\n    {UNSAFE_BLOCK} g() }}\n}}\n"
        );
        assert_eq!(rules(&text), []);
    }

    #[test]
    fn tidy_catches_missing_header() {
        assert_eq!(lines_of("\n\n#![no_std]\n//! late header\n"), [3]);
        assert_eq!(lines_of("/// item doc, not a module doc\nfn f() {}\n"), [1]);
        assert_eq!(lines_of(""), [1]);
    }

    #[test]
    fn tidy_catches_hidden_tests_and_todos() {
        let text = format!(
            "//! m\n{IGNORE_ATTR}]\n{SHOULD_PANIC_ATTR}(expected = \"x\")]\nfn f() {{ {TODO_MACRO}) }}\n\
             fn g() {{ {UNIMPLEMENTED_MACRO}) }}\n"
        );
        assert_eq!(lines_of(&text), [2, 3, 4, 5]);
    }

    #[test]
    fn tidy_allows_prose_that_names_forbidden_things() {
        let text = format!("//! m: no {IGNORE_ATTR}] here\n// {TODO_MACRO}) is banned, {UNSAFE_BLOCK} too\n");
        assert_eq!(rules(&text), []);
    }

    #[test]
    fn tidy_catches_hidden_doctests() {
        let text = "//! m\n/// ```ignore\n/// ```\n//! ```rust,should_panic\n/// ```no_run\n/// ```rust\n";
        assert_eq!(lines_of(text), [2, 4]);
    }

    #[test]
    fn tidy_catches_unsafe_without_safety() {
        let far = format!(
            "//! m\n// SAFETY: too far up.\nfn f() {{\n    a();\n    b();\n    {UNSAFE_BLOCK} g() }}\n}}\n"
        );
        assert_eq!(lines_of(&far), [6]);
        let none = format!("//! m\nfn f() {{ {UNSAFE_BLOCK} g() }} }}\n");
        assert_eq!(lines_of(&none), [2]);
    }

    #[test]
    fn tidy_accepts_long_safety_argument_right_above() {
        let text = format!("//! m\n// SAFETY: one,\n// two,\n// three,\n// four.\n{UNSAFE_BLOCK} g() }}\n");
        assert_eq!(rules(&text), []);
    }

    #[test]
    fn tidy_walk_skips_target_and_hidden_dirs() {
        let root = std::env::temp_dir().join(format!("xtask-tidy-walk-{}", std::process::id()));
        for dir in ["crates/a/src", "crates/a/target/debug", "xtask/.hidden", "examples"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        for file in
            ["crates/a/src/lib.rs", "crates/a/target/debug/gen.rs", "xtask/.hidden/x.rs", "examples/e.rs"]
        {
            std::fs::write(root.join(file), "fn no_header() {}\n").unwrap();
        }
        let (checked, offences) = check_tree(&root).unwrap();
        std::fs::remove_dir_all(&root).unwrap();
        assert_eq!(checked, 2);
        let paths: Vec<String> = offences.iter().map(|o| o.to_string()).collect();
        assert_eq!(
            paths,
            [
                "crates/a/src/lib.rs:1: module does not open with a `//!` header",
                "examples/e.rs:1: module does not open with a `//!` header"
            ]
        );
    }
}
