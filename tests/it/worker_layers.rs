//! The worker's modules form layers (declared once, in `socksgate::worker::LAYERS`): a module may name only
//! modules of lower layers, through `use super::...` or an inline `super::module::` path. This fails the build of
//! the tests when a lower module reaches up, which would bring back an import cycle.

use std::collections::HashMap;
use std::path::Path;

use socksgate::worker::LAYERS;

/// Module names a source file reaches through `super::`: every `super::NAME` outside comments, where a
/// `super::{a, b::c}` group counts each member. Names that are not worker modules are items of `mod.rs`.
fn super_refs(src: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in src.lines() {
        // A unit-test module's `super::` is the file itself.
        if line.trim_start().starts_with("#[cfg(test)]") {
            break;
        }
        let code = line.split("//").next().unwrap_or("");
        let mut rest = code;
        while let Some(i) = rest.find("super::") {
            rest = &rest[i + "super::".len()..];
            if let Some(group) = rest.strip_prefix('{') {
                // Members of the group are split at its own commas, not at those of nested groups.
                let mut depth = 0;
                let mut start = 0;
                for (j, c) in group.char_indices() {
                    match c {
                        '{' => depth += 1,
                        '}' if depth == 0 => {
                            push_first(&mut out, &group[start..j]);
                            break;
                        }
                        '}' => depth -= 1,
                        ',' if depth == 0 => {
                            push_first(&mut out, &group[start..j]);
                            start = j + 1;
                        }
                        _ => {}
                    }
                }
            } else {
                push_first(&mut out, rest);
            }
        }
    }
    out
}

/// Pushes the first path segment of `path` (`conn::Conn` -> `conn`).
fn push_first(out: &mut Vec<String>, path: &str) {
    let name: String = path
        .trim()
        .chars()
        .take_while(|c| c.is_alphanumeric() || *c == '_')
        .collect();
    if !name.is_empty() {
        out.push(name);
    }
}

#[test]
fn worker_modules_import_only_lower_layers() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/worker");
    let mut layer_of: HashMap<&str, usize> = HashMap::new();
    for (i, layer) in LAYERS.iter().enumerate() {
        for m in *layer {
            assert!(layer_of.insert(m, i).is_none(), "{m} is listed twice");
        }
    }
    let top = LAYERS.len();
    let mut files = 0;
    let mut violations = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("src/worker") {
        let path = entry.expect("dir entry").path();
        let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
            continue;
        };
        if path.extension().and_then(|e| e.to_str()) != Some("rs") || name == "mod" {
            continue;
        }
        files += 1;
        let Some(&mine) = layer_of.get(name) else {
            violations.push(format!("{name}.rs is not in worker::LAYERS"));
            continue;
        };
        let src = std::fs::read_to_string(&path).expect("read source");
        for used in super_refs(&src) {
            // Anything that is not a sibling module is an item of mod.rs, the dispatcher at the top; only the
            // dispatcher's own `impl Worker` part (the top layer) may use it.
            let theirs = layer_of.get(used.as_str()).copied().unwrap_or(top);
            let allowed = theirs < mine || (theirs == top && mine == top - 1);
            if !allowed {
                violations.push(format!(
                    "{name} (layer {mine}) uses super::{used} (layer {theirs})"
                ));
            }
        }
    }
    assert_eq!(
        files,
        layer_of.len(),
        "every module listed in LAYERS exists as src/worker/NAME.rs"
    );
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}

#[test]
fn the_scanner_sees_groups_and_inline_paths() {
    let src = "use super::{conn::Conn, ctx::{Ctx, Next}};\nlet x = super::relay::arm_idle(); // super::http\n";
    assert_eq!(super_refs(src), vec!["conn", "ctx", "relay"]);
}
