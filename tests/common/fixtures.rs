//! The real QEMU captures in `fixtures/` and how to read them.
//!
//! A capture is `c<N>.{s2d,d2s}.bin.zst`: one zstd frame holding every byte of one direction
//! of one connection. Captures of the same guest kernel share most of their pages, so all but
//! the reference capture are stored as zstd patches (`zstd --patch-from`): such a file has a
//! sidecar `<file>.patch-from` naming the capture it was encoded against, relative to the
//! file's own directory. This keeps five real migrations under 30 MB (see fixtures/README.md).
//!
//! Included by the integration tests (through `common`) and by the benchmarks (by path).
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};

/// The largest back-reference distance a patch may use (2 GiB): a patch refers back across
/// its whole reference, hundreds of MB, beyond zstd's default 128 MiB decoding window.
const WINDOW_LOG_MAX: u32 = 31;

/// `fixtures/` of this repository, with a clear failure when it is missing.
pub fn fixtures_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    assert!(
        dir.is_dir(),
        "fixture directory {} is missing: the QEMU captures ship with the repository \
         (fixtures/README.md)",
        dir.display()
    );
    dir
}

/// Every fixture directory that has QEMU's `result.json`, sorted.
pub fn fixture_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixtures_dir())
        .expect("read fixture dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.join("result.json").is_file())
        .collect();
    dirs.sort();
    assert!(!dirs.is_empty(), "no fixture with a result.json found");
    dirs
}

/// The reference a patched capture was encoded against, if it is a patch.
pub fn patch_reference(path: &Path) -> Option<PathBuf> {
    let mut side = path.as_os_str().to_owned();
    side.push(".patch-from");
    let text = std::fs::read_to_string(PathBuf::from(side)).ok()?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Some(dir.join(text.trim()))
}

/// The bytes of a capture, decompressed (and patched onto its reference where it is a patch).
pub fn load_capture(path: &Path) -> Vec<u8> {
    try_load_capture(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// [`load_capture`] without the panic, for callers that report errors their own way.
pub fn try_load_capture(path: &Path) -> std::io::Result<Vec<u8>> {
    let file = std::fs::File::open(path)?;
    let mut out = Vec::new();
    match patch_reference(path) {
        None => {
            let mut d = zstd::stream::read::Decoder::new(file)?;
            d.window_log_max(WINDOW_LOG_MAX)?;
            d.read_to_end(&mut out)?;
        }
        Some(reference) => {
            let prefix = try_load_capture(&reference).map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!("reference {} of the patch: {e}", reference.display()),
                )
            })?;
            let mut d = zstd::stream::read::Decoder::with_ref_prefix(
                std::io::BufReader::new(file),
                &prefix,
            )?;
            d.window_log_max(WINDOW_LOG_MAX)?;
            d.read_to_end(&mut out)?;
        }
    }
    Ok(out)
}

/// A path `migshaper inspect` can read for this capture: the capture itself when it is a
/// plain zstd file, else its decompressed bytes written once under the build's temporary
/// directory (written to a unique name and renamed, so concurrent tests never see half a file).
pub fn plain_capture(path: &Path) -> PathBuf {
    if patch_reference(path).is_none() {
        return path.to_owned();
    }
    let fixture = path
        .parent()
        .and_then(|p| p.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().trim_end_matches(".zst").to_owned())
        .unwrap_or_default();
    let tmp_root = option_env!("CARGO_TARGET_TMPDIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = tmp_root.join("migshaper-fixtures").join(fixture);
    let out = dir.join(name);
    if let (Ok(have), Ok(src)) = (std::fs::metadata(&out), std::fs::metadata(path)) {
        // Written after the patch was: up to date (a rewritten fixture is newer).
        if have.modified().ok() >= src.modified().ok() {
            return out;
        }
    }
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let part = dir.join(format!(
        ".{}.{}.{:?}",
        out.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::write(&part, load_capture(path)).unwrap_or_else(|e| panic!("{}: {e}", part.display()));
    std::fs::rename(&part, &out).unwrap_or_else(|e| panic!("{}: {e}", out.display()));
    out
}
