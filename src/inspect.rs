//! `migshaper inspect`: offline analysis of captured migration streams.
//!
//! Streams capture files (plain, or zstd when the name ends in `.zst`) in
//! [`CHUNK_BYTES`] chunks through the [`crate::qemu`] parsers and sums what they count into a
//! [`Report`]: the main channel's bytes per phase, and the migration's RAM counters with
//! QEMU's own `query-migrate` definitions (main channel, return path and multifd channels
//! together, with the [`MultifdLedger`] correction for `normal`).
//!
//! This module only reads: it never loads a whole capture into memory, never writes, and
//! never fails on stream contents. Bytes the parser cannot understand are counted and named
//! by the [`Outcome`]; only a file that cannot be opened, read or decompressed is an
//! [`InspectError`].
//!
//! Multifd channels carry no phase markers, and a capture file has no timeline that would
//! tell which of their bytes were sent during which phase of the main channel. Their bytes are
//! therefore reported under `multifd` only (QEMU's `multifd-bytes`), not in `phases`, which
//! always describe the main channel alone.

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;

use crate::qemu::{
    ChannelKind, DesyncReason, EventKind, MultifdLedger, Outcome, RamCounters, ReturnPathParser,
    Stats, StreamParser,
};

/// Size of each read from a capture file (after decompression).
pub const CHUNK_BYTES: usize = 256 * 1024;

/// A capture file that could not be analysed.
#[derive(Debug, thiserror::Error)]
pub enum InspectError {
    /// The file could not be opened (missing, permissions, ...).
    #[error("cannot open capture {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Reading the file failed (a directory, an I/O error, ...).
    #[error("cannot read capture {} after {offset} bytes: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Bytes read successfully before the failure.
        offset: u64,
        /// Why.
        source: io::Error,
    },
    /// A `.zst` file is not valid zstd, or ends in the middle of a frame.
    #[error(
        "cannot decompress capture {} (zstd) after {offset} decompressed bytes: {source}",
        path.display()
    )]
    Decompress {
        /// The file.
        path: PathBuf,
        /// Decompressed bytes obtained before the failure.
        offset: u64,
        /// Why.
        source: io::Error,
    },
}

impl InspectError {
    /// The file concerned.
    pub fn path(&self) -> &Path {
        match self {
            InspectError::Open { path, .. }
            | InspectError::Read { path, .. }
            | InspectError::Decompress { path, .. } => path,
        }
    }

    /// What the user can do about it, in one sentence.
    pub fn hint(&self) -> &'static str {
        match self {
            InspectError::Open { .. } | InspectError::Read { .. } => {
                "check the path: inspect takes capture files of one connection direction \
                 each (raw bytes, or zstd-compressed with a .zst name)"
            }
            InspectError::Decompress { .. } => {
                "a .zst name means zstd-compressed; rename the file if it is raw bytes, or \
                 recover what is readable with `zstd -dc FILE > FILE.bin` and inspect that"
            }
        }
    }
}

/// How the captured migration ended, as one word (the JSON `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InspectOutcome {
    /// Every file ended cleanly: the main channel with QEMU_VM_EOF, the return path with
    /// SHUT 0, multifd channels between packets.
    Completed,
    /// A stream stopped mid-record or before its end marker.
    Truncated,
    /// The main channel file is empty.
    Empty,
    /// The main channel is TLS: encrypted, counted opaquely.
    Tls,
    /// The main channel's first bytes are not a QEMU migration stream.
    NotQemu,
    /// A stream started as QEMU's but became unparseable (or uses an unsupported feature);
    /// the rest was counted opaquely.
    Garbled,
    /// The return path reported failure (SHUT with a non-zero code).
    Failed,
}

impl InspectOutcome {
    /// Maps a parser's [`Outcome`] after `finish`.
    pub fn from_outcome(outcome: Outcome) -> Self {
        match outcome {
            Outcome::Completed => InspectOutcome::Completed,
            // `Running` cannot happen after `finish`; an unfinished stream is truncated.
            Outcome::Truncated | Outcome::Running => InspectOutcome::Truncated,
            Outcome::Empty => InspectOutcome::Empty,
            Outcome::Failed { .. } => InspectOutcome::Failed,
            Outcome::Opaque(DesyncReason::Tls) => InspectOutcome::Tls,
            Outcome::Opaque(DesyncReason::UnknownChannel) => InspectOutcome::NotQemu,
            Outcome::Opaque(_) => InspectOutcome::Garbled,
        }
    }

    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            InspectOutcome::Completed => "completed",
            InspectOutcome::Truncated => "truncated",
            InspectOutcome::Empty => "empty",
            InspectOutcome::Tls => "tls",
            InspectOutcome::NotQemu => "not_qemu",
            InspectOutcome::Garbled => "garbled",
            InspectOutcome::Failed => "failed",
        }
    }
}

impl fmt::Display for InspectOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The main channel's bytes per phase; they sum to [`Report::bytes`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Phases {
    /// Header, configuration and setup sections, up to the first PART section.
    pub setup: u64,
    /// Iterative pre-copy, from the first PART section.
    pub precopy: u64,
    /// Stop-and-copy: from the switchover to the end (precopy) or to the end of the
    /// PACKAGED blob (postcopy), device state included.
    pub downtime: u64,
    /// After the PACKAGED blob (postcopy only).
    pub postcopy: u64,
}

/// QEMU's RAM counters, summed over every file of the migration.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Ram {
    /// QEMU `precopy-bytes`: RAM record bytes in pre-copy PART sections.
    pub precopy_bytes: u64,
    /// QEMU `downtime-bytes`: RAM record bytes of the final (END) `ram` section.
    pub downtime_bytes: u64,
    /// QEMU `postcopy-bytes`: RAM record bytes sent after the switch to post-copy.
    pub postcopy_bytes: u64,
    /// QEMU `normal`: full pages, on the main channel and in multifd packets (a page QEMU
    /// 7.2 repeats across two consecutive multifd packets counted once).
    pub normal_pages: u64,
    /// QEMU `duplicate`: zero pages.
    pub zero_pages: u64,
}

/// The return path (destination→source bytes of the main connection).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ReturnPath {
    /// Size of the return-path file (0 when none was given).
    pub bytes: u64,
    /// QEMU `postcopy-requests`: REQ_PAGES and REQ_PAGES_ID messages.
    pub page_requests: u64,
}

/// The multifd channels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Multifd {
    /// Multifd files given.
    pub channels: u64,
    /// QEMU `multifd-bytes`: every multifd packet after each channel's 64-byte initial
    /// packet, header and payload.
    pub bytes: u64,
}

/// What a file was given as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The main channel's source→destination bytes.
    Main,
    /// The main connection's destination→source bytes.
    ReturnPath,
    /// A multifd channel's source→destination bytes.
    Multifd,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Main => "main",
            Role::ReturnPath => "return path",
            Role::Multifd => "multifd",
        }
    }
}

/// Per-file details, for the human table (not part of the JSON).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileReport {
    /// The file.
    pub path: PathBuf,
    /// What it was given as.
    pub role: Role,
    /// The channel kind recognised from its first bytes (`None`: empty, or a return path).
    pub channel: Option<ChannelKind>,
    /// Decompressed bytes.
    pub bytes: u64,
    /// Bytes counted without being understood.
    pub opaque_bytes: u64,
    /// How its stream ended.
    pub outcome: Outcome,
}

/// The analysis of one captured migration; serialises to the `inspect --json` object.
///
/// `channel`, `bytes`, `page_size`, `phases`, `precopy_passes` and `opaque_bytes` describe
/// the main channel file; `ram` sums every file; `outcome` is the main channel's, or, when
/// the main channel completed, that of the first other file that did not complete (an empty
/// return-path or multifd file counts as complete).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The main file's channel kind (`main` for a QEMU main channel; `tls`, `unknown`,
    /// `multifd`, `preempt`, `recovery`; `none` for an empty file).
    pub channel: &'static str,
    /// Bytes of the main file (after decompression).
    pub bytes: u64,
    /// The target page size, once the stream revealed it.
    pub page_size: Option<u32>,
    /// The main file's bytes per phase; they sum to `bytes`.
    pub phases: Phases,
    /// Pre-copy passes (1 + wraps of the page scan; 0 if pre-copy never started).
    pub precopy_passes: u32,
    /// Main-file bytes counted without being understood (also included in `phases`).
    pub opaque_bytes: u64,
    /// How the migration's streams ended.
    pub outcome: InspectOutcome,
    /// QEMU's RAM counters over all files.
    pub ram: Ram,
    /// The return path.
    pub return_path: ReturnPath,
    /// The multifd channels.
    pub multifd: Multifd,
    /// Why the main channel became opaque, if it did.
    #[serde(skip)]
    pub desync: Option<DesyncReason>,
    /// Every file, main first, then the return path, then multifd channels in the order
    /// given.
    #[serde(skip)]
    pub files: Vec<FileReport>,
}

/// One capture file, read in chunks.
struct Capture {
    path: PathBuf,
    reader: Box<dyn Read>,
    zst: bool,
    offset: u64,
    buf: Vec<u8>,
}

impl Capture {
    fn open(path: &Path) -> Result<Self, InspectError> {
        let file = File::open(path).map_err(|source| InspectError::Open {
            path: path.to_owned(),
            source,
        })?;
        let zst = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(".zst"));
        let reader: Box<dyn Read> = if zst {
            let d = zstd::stream::read::Decoder::new(file).map_err(|source| {
                InspectError::Decompress {
                    path: path.to_owned(),
                    offset: 0,
                    source,
                }
            })?;
            Box::new(d)
        } else {
            Box::new(file)
        };
        Ok(Capture {
            path: path.to_owned(),
            reader,
            zst,
            offset: 0,
            buf: vec![0; CHUNK_BYTES],
        })
    }

    /// The next chunk, or `None` at the end of the file.
    fn next_chunk(&mut self) -> Result<Option<&[u8]>, InspectError> {
        loop {
            match self.reader.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => {
                    self.offset += n as u64;
                    return Ok(Some(&self.buf[..n]));
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(source) => {
                    let (path, offset) = (self.path.clone(), self.offset);
                    // A failed read of the underlying file (EISDIR, EIO) is a read error
                    // even through the decoder; anything else the decoder says is about
                    // the compressed data.
                    let err = if self.zst && source.raw_os_error().is_none() {
                        InspectError::Decompress {
                            path,
                            offset,
                            source,
                        }
                    } else {
                        InspectError::Read {
                            path,
                            offset,
                            source,
                        }
                    };
                    return Err(err);
                }
            }
        }
    }
}

/// Drains a stream parser's events, recording multifd packets in the ledger.
/// Returns the number of the last multifd packet seen, if any.
fn drain(p: &mut StreamParser, ledger: &mut MultifdLedger) -> Option<u64> {
    let mut last = None;
    while let Some(e) = p.poll_event() {
        if let EventKind::MultifdPacket(pkt) = e.kind {
            ledger.record(&pkt);
            last = Some(pkt.packet_num);
        }
    }
    last
}

fn file_report(path: &Path, role: Role, p: &StreamParser) -> FileReport {
    FileReport {
        path: path.to_owned(),
        role,
        channel: p.channel(),
        bytes: p.stats().total_bytes,
        opaque_bytes: p.stats().opaque_bytes,
        outcome: p.outcome(),
    }
}

/// A multifd channel being read, interleaved with the others.
struct MultifdInput {
    capture: Capture,
    parser: StreamParser,
    /// Number of the last packet with pages seen on this channel.
    last_packet: Option<u64>,
    done: bool,
}

impl MultifdInput {
    fn open(path: &Path) -> Result<Self, InspectError> {
        Ok(MultifdInput {
            capture: Capture::open(path)?,
            parser: StreamParser::new(),
            last_packet: None,
            done: false,
        })
    }
}

/// Analyses one captured migration: `main` holds the main channel's source→destination
/// bytes, `return_path` its destination→source bytes, `multifd` the source→destination
/// bytes of each multifd channel. Files ending in `.zst` are decompressed on the fly.
///
/// Every file is opened before any is parsed, so a missing file fails at once. Multifd
/// channels are read interleaved by packet number (the channel that is furthest behind is
/// read next) so that the [`MultifdLedger`] sees consecutive packets together.
pub fn inspect(
    main: &Path,
    return_path: Option<&Path>,
    multifd: &[PathBuf],
) -> Result<Report, InspectError> {
    let mut main_in = Capture::open(main)?;
    let mut rp_in = return_path.map(Capture::open).transpose()?;
    let mut mf_in = multifd
        .iter()
        .map(|p| MultifdInput::open(p))
        .collect::<Result<Vec<_>, InspectError>>()?;

    // Offline, time only stamps events, which are not reported.
    let now = Instant::now();
    let mut ledger = MultifdLedger::new();
    let mut total = RamCounters::default();

    let mp = read_stream(&mut main_in, now, &mut ledger)?;
    let main_stats = *mp.stats();
    add_ram(&mut total, &main_stats);
    let mut files = vec![file_report(main, Role::Main, &mp)];

    let mut rp_bytes = 0;
    if let (Some(rp_in), Some(path)) = (rp_in.as_mut(), return_path) {
        let rp = read_return_path(rp_in, now)?;
        add_ram(&mut total, rp.stats());
        rp_bytes = rp.stats().total_bytes;
        files.push(FileReport {
            path: path.to_owned(),
            role: Role::ReturnPath,
            channel: None,
            bytes: rp_bytes,
            opaque_bytes: rp.stats().opaque_bytes,
            outcome: rp.outcome(),
        });
    }

    read_multifd(&mut mf_in, main_stats.page_size, now, &mut ledger)?;
    for (m, path) in mf_in.iter().zip(multifd) {
        add_ram(&mut total, m.parser.stats());
        files.push(file_report(path, Role::Multifd, &m.parser));
    }

    let outcome = overall_outcome(mp.outcome(), &files[1..]);
    let desync = match mp.outcome() {
        Outcome::Opaque(reason) => Some(reason),
        _ => None,
    };

    let ph = main_stats.phases;
    Ok(Report {
        channel: mp.channel().map_or("none", ChannelKind::as_str),
        bytes: main_stats.total_bytes,
        page_size: main_stats.page_size,
        // A stream parser never attributes to the return-path phase, and after `finish`
        // nothing is unattributed: these four sum to `bytes`.
        phases: Phases {
            setup: ph.setup,
            precopy: ph.precopy,
            downtime: ph.downtime,
            postcopy: ph.postcopy,
        },
        precopy_passes: main_stats.passes,
        opaque_bytes: main_stats.opaque_bytes,
        outcome,
        ram: Ram {
            precopy_bytes: total.precopy_bytes,
            downtime_bytes: total.downtime_bytes,
            postcopy_bytes: total.postcopy_bytes,
            normal_pages: total.normal_pages.saturating_sub(ledger.repeated_pages()),
            zero_pages: total.zero_pages,
        },
        return_path: ReturnPath {
            bytes: rp_bytes,
            page_requests: total.page_requests,
        },
        multifd: Multifd {
            channels: multifd.len() as u64,
            bytes: total.multifd_bytes,
        },
        desync,
        files,
    })
}

/// Feeds a whole capture to a fresh stream parser and finishes it.
fn read_stream(
    capture: &mut Capture,
    now: Instant,
    ledger: &mut MultifdLedger,
) -> Result<StreamParser, InspectError> {
    let mut p = StreamParser::new();
    while let Some(chunk) = capture.next_chunk()? {
        p.feed(chunk, now);
        drain(&mut p, ledger);
    }
    p.finish(now);
    drain(&mut p, ledger);
    Ok(p)
}

/// Feeds a whole return-path capture to a fresh parser and finishes it.
fn read_return_path(capture: &mut Capture, now: Instant) -> Result<ReturnPathParser, InspectError> {
    let mut rp = ReturnPathParser::new();
    while let Some(chunk) = capture.next_chunk()? {
        rp.feed(chunk, now);
        while rp.poll_event().is_some() {}
    }
    rp.finish(now);
    while rp.poll_event().is_some() {}
    Ok(rp)
}

/// Reads the multifd channels to their end, interleaved: the channel furthest behind in
/// packet numbers (one that has shown no packet yet first) is fed next, so that every
/// channel stays near the same packet numbers and the ledger sees neighbours together.
fn read_multifd(
    inputs: &mut [MultifdInput],
    page_size: Option<u32>,
    now: Instant,
    ledger: &mut MultifdLedger,
) -> Result<(), InspectError> {
    for m in inputs.iter_mut() {
        if let Some(p) = page_size {
            m.parser.set_page_size_hint(p);
        }
    }
    while let Some(m) = inputs
        .iter_mut()
        .filter(|m| !m.done)
        .min_by_key(|m| m.last_packet.map_or(0, |n| n.saturating_add(1)))
    {
        match m.capture.next_chunk()? {
            Some(chunk) => {
                m.parser.feed(chunk, now);
                if let Some(n) = drain(&mut m.parser, ledger) {
                    m.last_packet = Some(n);
                }
            }
            None => {
                m.parser.finish(now);
                drain(&mut m.parser, ledger);
                m.done = true;
            }
        }
    }
    Ok(())
}

/// Adds the counters a migration sums over its files to `total`.
fn add_ram(total: &mut RamCounters, s: &Stats) {
    total.precopy_bytes += s.ram.precopy_bytes;
    total.downtime_bytes += s.ram.downtime_bytes;
    total.postcopy_bytes += s.ram.postcopy_bytes;
    total.normal_pages += s.ram.normal_pages;
    total.zero_pages += s.ram.zero_pages;
    total.multifd_bytes += s.ram.multifd_bytes;
    total.page_requests += s.ram.page_requests;
}

/// The main channel's outcome or, when it completed, that of the first other file that
/// did not complete (an empty return-path or multifd file counts as complete).
fn overall_outcome(main: Outcome, others: &[FileReport]) -> InspectOutcome {
    let main_outcome = InspectOutcome::from_outcome(main);
    if main_outcome != InspectOutcome::Completed {
        return main_outcome;
    }
    others
        .iter()
        .map(|f| InspectOutcome::from_outcome(f.outcome))
        .find(|o| !matches!(o, InspectOutcome::Completed | InspectOutcome::Empty))
        .unwrap_or(InspectOutcome::Completed)
}

/// Describes a parser outcome in a few words, for the table.
fn describe(outcome: Outcome) -> String {
    match outcome {
        Outcome::Opaque(reason) => format!(
            "{} ({reason})",
            InspectOutcome::from_outcome(outcome).as_str()
        ),
        Outcome::Failed { code } => format!("failed (SHUT {code})"),
        o => InspectOutcome::from_outcome(o).as_str().to_owned(),
    }
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The human table printed by `migshaper inspect` without `--json`.
impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(main) = self.files.first() {
            writeln!(f, "capture      {}", main.path.display())?;
        }
        let page = self
            .page_size
            .map_or_else(|| "unknown".to_owned(), |p| p.to_string());
        writeln!(f, "channel      {}, page size {page}", self.channel)?;
        writeln!(f, "outcome      {}", self.outcome)?;
        if let Some(reason) = self.desync {
            writeln!(
                f,
                "parsing      stopped: {reason}; the remaining {} bytes were counted \
                 without being understood",
                self.opaque_bytes
            )?;
        }
        writeln!(f)?;
        writeln!(
            f,
            "{:<10} {:>14} {:>11} {:>8}",
            "phase", "bytes", "MiB", "share"
        )?;
        let rows = [
            ("setup", self.phases.setup),
            ("precopy", self.phases.precopy),
            ("downtime", self.phases.downtime),
            ("postcopy", self.phases.postcopy),
            ("total", self.bytes),
        ];
        for (name, n) in rows {
            let share = if self.bytes == 0 {
                "-".to_owned()
            } else {
                format!("{:.2} %", n as f64 * 100.0 / self.bytes as f64)
            };
            writeln!(f, "{name:<10} {n:>14} {:>11.2} {share:>8}", mib(n))?;
        }
        writeln!(f, "(phase wall times are not known offline)")?;
        writeln!(f)?;
        writeln!(f, "pre-copy passes    {}", self.precopy_passes)?;
        writeln!(f, "opaque bytes       {}", self.opaque_bytes)?;
        writeln!(f)?;
        writeln!(
            f,
            "RAM counters (QEMU query-migrate definitions, all files)"
        )?;
        let r = &self.ram;
        let counters = [
            ("precopy-bytes", r.precopy_bytes),
            ("downtime-bytes", r.downtime_bytes),
            ("postcopy-bytes", r.postcopy_bytes),
            ("multifd-bytes", self.multifd.bytes),
            ("normal (pages)", r.normal_pages),
            ("duplicate (pages)", r.zero_pages),
            ("postcopy-requests", self.return_path.page_requests),
        ];
        for (name, n) in counters {
            writeln!(f, "  {name:<18} {n:>14}")?;
        }
        writeln!(f)?;
        self.fmt_files(f)
    }
}

impl Report {
    /// The per-file table, when more than the main channel was given.
    fn fmt_files(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.files.len() > 1 {
            writeln!(f, "files")?;
            for file in &self.files {
                let kind = match (file.role, file.channel) {
                    (Role::ReturnPath, _) => "return path".to_owned(),
                    (_, Some(k)) => k.as_str().to_owned(),
                    (_, None) => "none".to_owned(),
                };
                writeln!(
                    f,
                    "  {:<12} {:>14} bytes  {:<12} {}  {}",
                    file.role.as_str(),
                    file.bytes,
                    kind,
                    describe(file.outcome),
                    file.path.display()
                )?;
            }
            if self.multifd.channels > 0 {
                writeln!(
                    f,
                    "(multifd bytes are not split by phase: a capture has no timeline)"
                )?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_map_to_words() {
        let cases = [
            (Outcome::Completed, "completed"),
            (Outcome::Truncated, "truncated"),
            (Outcome::Empty, "empty"),
            (Outcome::Failed { code: 1 }, "failed"),
            (Outcome::Opaque(DesyncReason::Tls), "tls"),
            (Outcome::Opaque(DesyncReason::UnknownChannel), "not_qemu"),
            (Outcome::Opaque(DesyncReason::BadFooter), "garbled"),
        ];
        for (o, word) in cases {
            let ours = InspectOutcome::from_outcome(o);
            assert_eq!(ours.as_str(), word);
            assert_eq!(
                serde_json::to_string(&ours).expect("serialise"),
                format!("\"{word}\"")
            );
        }
    }

    #[test]
    fn missing_file_names_the_file() {
        let path = Path::new("/nonexistent/migshaper-inspect/c0.s2d.bin");
        let err = inspect(path, None, &[]).expect_err("missing file");
        assert!(matches!(err, InspectError::Open { .. }));
        assert_eq!(err.path(), path);
        assert!(err.to_string().contains("c0.s2d.bin"), "{err}");
    }

    #[test]
    fn json_has_exactly_the_documented_keys() {
        let dir =
            std::env::temp_dir().join(format!("migshaper-inspect-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let path = dir.join("empty.bin");
        std::fs::write(&path, b"").expect("write");
        let report = inspect(&path, None, &[]).expect("inspect");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(report.outcome, InspectOutcome::Empty);
        let v = serde_json::to_value(&report).expect("serialise");
        let mut keys: Vec<&str> = v
            .as_object()
            .expect("object")
            .keys()
            .map(String::as_str)
            .collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "bytes",
                "channel",
                "multifd",
                "opaque_bytes",
                "outcome",
                "page_size",
                "phases",
                "precopy_passes",
                "ram",
                "return_path"
            ]
        );
        assert_eq!(v["channel"], "none");
        assert_eq!(v["page_size"], serde_json::Value::Null);
    }
}
