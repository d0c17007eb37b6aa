//! The records file: one JSON line per finished migration (`serve --records`).

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tracing::warn;

use super::record::Record;

/// The records file: one JSON line per finished migration, written and flushed at once.
#[derive(Debug)]
pub struct RecordSink {
    path: PathBuf,
    file: Mutex<File>,
}

impl RecordSink {
    /// Opens (creates, appends to) the records file.
    pub fn open(path: &Path) -> std::io::Result<RecordSink> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(RecordSink {
            path: path.to_path_buf(),
            file: Mutex::new(file),
        })
    }

    pub(super) fn write(&self, record: &Record) {
        let mut line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(e) => {
                warn!(error = %e, "cannot serialise a migration record");
                return;
            }
        };
        line.push('\n');
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        // One write of the whole line (O_APPEND), then flush: a crash elsewhere never
        // leaves half a record, and no record waits in a buffer.
        if let Err(e) = f.write_all(line.as_bytes()).and_then(|_| f.flush()) {
            warn!(path = %self.path.display(), error = %e, "cannot write the migration record");
        }
    }
}
