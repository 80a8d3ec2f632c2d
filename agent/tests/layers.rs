//! The agent's layers import downward only, and no source file grows past
//! 1,000 lines. ARCHITECTURE.md draws the layers; this test is what keeps
//! them true: it reads every file under `src/` and fails on a `crate::`
//! path that names a module of a higher layer (or a module it does not
//! know, so that a new top-level module must be given its place here).

use std::path::{Path, PathBuf};

/// Top-level modules from the bottom up. A file may name its own module
/// and any module of a lower rank.
const LAYERS: &[(&str, u32)] = &[
    ("units", 0),
    ("state", 1),
    ("api_types", 2),
    ("cluster", 3),
    ("reconcile", 4),
    ("api", 5),
    ("daemon", 6),
    ("console", 7),
    ("cli", 8),
];

/// Items of the crate root that every layer may use.
const ROOT_ITEMS: &[&str] = &["error_chain", "error_chain_anyhow"];

const MAX_LINES: usize = 1_000;

fn rank(module: &str) -> Option<u32> {
    LAYERS
        .iter()
        .find(|(name, _)| *name == module)
        .map(|(_, rank)| *rank)
}

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to (`None` for `lib.rs`/`main.rs`).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next()?.as_os_str().to_str()?;
    match first {
        "lib.rs" | "main.rs" => None,
        name => Some(name.trim_end_matches(".rs").to_string()),
    }
}

/// Every top-level module a line names through `crate::` (including
/// `use crate::{a::…, b}` groups).
fn named_modules(line: &str) -> Vec<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        rest = &rest[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            for part in group.split([',', '}']) {
                let name: String = part
                    .trim()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    names.push(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            names.push(name);
        }
    }
    names
}

/// What in `text` (the file `file` of module `module`) breaks the layering.
fn violations(module: &str, file: &str, text: &str) -> Vec<String> {
    let Some(own) = rank(module) else {
        return vec![format!(
            "{file}: module `{module}` has no layer; give it one in tests/layers.rs and ARCHITECTURE.md"
        )];
    };
    let mut found = Vec::new();
    for (number, line) in text.lines().enumerate() {
        for named in named_modules(line) {
            if named == module || ROOT_ITEMS.contains(&named.as_str()) {
                continue;
            }
            match rank(&named) {
                Some(theirs) if theirs < own => {}
                Some(_) => found.push(format!(
                    "{file}:{}: `{module}` imports `{named}`, which is not below it",
                    number + 1
                )),
                None => found.push(format!(
                    "{file}:{}: `crate::{named}` is not a known module or root item",
                    number + 1
                )),
            }
        }
    }
    found
}

#[test]
fn every_layer_imports_only_layers_below_it_and_no_file_is_too_long() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    assert!(files.len() > 40, "found only {} source files", files.len());
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&src).unwrap().display().to_string();
        let lines = text.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{shown}: {lines} lines; split it (at most {MAX_LINES})"
            ));
        }
        if let Some(module) = module_of(&src, file) {
            problems.extend(violations(&module, &shown, &text));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_sees_upward_imports_groups_and_unknown_modules() {
    let file = "state/x.rs";
    assert!(violations("state", file, "use crate::state::vms::VmRecord;").is_empty());
    assert!(violations("state", file, "let x = crate::error_chain(&e);").is_empty());
    assert_eq!(
        violations("state", file, "use crate::api::ApiError;").len(),
        1
    );
    assert_eq!(
        violations(
            "cluster",
            file,
            "use crate::{state::Command, reconcile::x};"
        )
        .len(),
        1
    );
    assert_eq!(violations("api", file, "crate::nowhere::f()").len(), 1);
    assert_eq!(violations("gadgets", file, "").len(), 1);
    // Two modules of the same rank would be a circle waiting to happen.
    assert_eq!(violations("console", file, "crate::cli::x()").len(), 1);
    // Comments do not count.
    assert!(violations("state", file, "// see crate::api::router").is_empty());
}
