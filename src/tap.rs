//! What sees the bytes a route forwards: the [`Tap`] interface between the pumps that move
//! the bytes and whatever meters, parses or records them.
//!
//! It sits below both [`crate::proxy`] (which calls taps) and [`crate::migration`] (whose
//! taps account migrations), so neither reaches into the other.

use std::io;

/// Something that sees every forwarded chunk after it was written (metering, parsing).
pub trait Tap: Send {
    /// Called with each chunk, in order, after it was handed to the receiving socket.
    fn on_chunk(&mut self, chunk: &[u8]);

    /// Whether the tap needs to see the bytes. While it does not, the pump may forward
    /// without copying them through user space (splice) and reports only their number.
    fn wants_bytes(&self) -> bool {
        true
    }

    /// Called instead of [`Tap::on_chunk`] with the length of a chunk the tap did not see
    /// (only while [`Tap::wants_bytes`] is false).
    fn on_unseen(&mut self, _n: usize) {}
}

/// Counts forwarded bytes into a metric (routes that do not parse).
impl Tap for metrics::Counter {
    fn on_chunk(&mut self, chunk: &[u8]) {
        self.increment(chunk.len() as u64);
    }

    fn wants_bytes(&self) -> bool {
        false
    }

    fn on_unseen(&mut self, n: usize) {
        self.increment(n as u64);
    }
}

impl Tap for () {
    fn on_chunk(&mut self, _: &[u8]) {}

    fn wants_bytes(&self) -> bool {
        false
    }
}

impl<T: Tap> Tap for Option<T> {
    fn on_chunk(&mut self, chunk: &[u8]) {
        if let Some(t) = self {
            t.on_chunk(chunk);
        }
    }

    fn wants_bytes(&self) -> bool {
        self.as_ref().is_some_and(T::wants_bytes)
    }

    fn on_unseen(&mut self, n: usize) {
        if let Some(t) = self {
            t.on_unseen(n);
        }
    }
}

impl<A: Tap, B: Tap> Tap for (A, B) {
    fn on_chunk(&mut self, chunk: &[u8]) {
        self.0.on_chunk(chunk);
        self.1.on_chunk(chunk);
    }

    fn wants_bytes(&self) -> bool {
        self.0.wants_bytes() || self.1.wants_bytes()
    }

    fn on_unseen(&mut self, n: usize) {
        self.0.on_unseen(n);
        self.1.on_unseen(n);
    }
}

/// Writes every forwarded byte of one direction to a file (`serve --capture`).
#[derive(Debug)]
pub struct CaptureTap {
    path: std::path::PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
}

impl CaptureTap {
    /// Creates (truncates) `path`.
    pub fn create(path: std::path::PathBuf) -> io::Result<CaptureTap> {
        let f = std::fs::File::create(&path)?;
        Ok(CaptureTap {
            path,
            out: Some(std::io::BufWriter::with_capacity(1 << 20, f)),
        })
    }
}

impl Tap for CaptureTap {
    fn on_chunk(&mut self, chunk: &[u8]) {
        use std::io::Write;
        if let Some(out) = &mut self.out {
            if let Err(e) = out.write_all(chunk) {
                tracing::warn!(path = %self.path.display(), error = %e, "capture write failed; capture of this direction stops");
                self.out = None;
            }
        }
    }
}

impl Drop for CaptureTap {
    fn drop(&mut self) {
        use std::io::Write;
        if let Some(out) = &mut self.out {
            let _ = out.flush();
        }
    }
}
