//! Helpers for the library's unit tests.

use std::path::PathBuf;

/// Writes `text` to `file` in a folder of the system temp directory named after `folder` and this process, and
/// returns the file's path (the unit tests that read files from disk: users file, resolv.conf, hosts, ...).
pub(crate) fn scratch_file(folder: &str, file: &str, text: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{folder}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(file);
    std::fs::write(&path, text).unwrap();
    path
}
