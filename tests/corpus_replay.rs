//! Replays every committed fuzz corpus file (`fuzz/corpus/<target>/*`) through the same target bodies that the
//! cargo-fuzz binaries run, on the stable toolchain. A panic in any target on any file fails the test, so crash
//! inputs added to the corpus stay fixed.

// The fuzz crate's targets are `pub` for its fuzz_targets/ binaries; here they are one private module.
#[allow(unreachable_pub)]
#[path = "../fuzz/src/targets.rs"]
mod targets;

use std::panic;
use std::path::Path;

#[test]
fn every_corpus_file_passes_its_target() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut failures = Vec::new();
    let mut total = 0usize;
    for (name, target) in targets::TARGETS {
        let dir = root.join(name);
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("corpus folder {}: {e}", dir.display()))
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect();
        files.sort();
        assert!(
            !files.is_empty(),
            "corpus folder {} is empty",
            dir.display()
        );
        for path in files {
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            total += 1;
            if panic::catch_unwind(|| target(&data)).is_err() {
                failures.push(format!(
                    "{name}/{}",
                    path.file_name().unwrap_or_default().to_string_lossy()
                ));
            }
        }
    }
    // Every corpus folder belongs to a target (a typo would silently skip files).
    for entry in std::fs::read_dir(&root)
        .expect("fuzz/corpus exists")
        .filter_map(Result::ok)
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        assert!(
            targets::TARGETS.iter().any(|(t, _)| *t == name),
            "fuzz/corpus/{name} matches no target"
        );
    }
    eprintln!("replayed {total} corpus files, {} failed", failures.len());
    assert!(failures.is_empty(), "targets panicked on: {failures:#?}");
}
