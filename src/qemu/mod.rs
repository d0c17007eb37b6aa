//! Passive, sans-IO parser of QEMU live-migration streams: attributes every byte of a
//! connection to a migration phase and keeps QEMU's own RAM counters, without changing or
//! holding back a single byte.
//!
//! One parser per connection direction:
//! * [`StreamParser`] for the source→destination bytes of any connection. It recognises the
//!   channel from its first bytes ([`ChannelKind`]): the main channel (`QEVM`), a postcopy
//!   recovery main channel (starts with a command), a multifd channel, the postcopy preempt
//!   channel (bare RAM records), TLS or unknown (both counted opaquely).
//! * [`ReturnPathParser`] for the destination→source bytes of the main connection.
//!
//! # Contract
//! * Feed bytes in order with `feed(bytes, now)`, in slices of any size. Whole, random
//!   splits or byte by byte give identical counters and events (only the `at` timestamps
//!   differ when `now` differs).
//! * Nothing here allocates from a length read in the stream, buffers more than
//!   [`MAX_HEADER_BYTES`] of headers or scans page bodies: page bodies, PACKAGED blobs and
//!   the VMDESCRIPTION JSON are skipped by count. The only bytes ever read twice are the
//!   few look-ahead bytes of a rejected footer candidate while skipping device state.
//! * The parser never fails the connection. Input it cannot parse switches it to opaque
//!   mode: the rest of the connection is counted as opaque bytes in the current phase, and a
//!   [`EventKind::Desync`] says why. No input can make it panic, loop or grow memory.
//! * Outputs are pulled: [`StreamParser::stats`] (byte tallies and counters),
//!   [`StreamParser::outcome`] and discrete [`Event`]s from `poll_event()`.
//!
//! # Phases (main channel, docs/qemu-stream.md §5)
//! [`Phase::Setup`] from the first byte; [`Phase::Precopy`] at the first PART section;
//! [`Phase::Downtime`] at the first of SWITCHOVER_START, END (before postcopy), FULL after a
//! PART, POSTCOPY_RAM_DISCARD, PING 2 after ADVISE(16), PACKAGED or EOF; [`Phase::Postcopy`]
//! from the byte right after the PACKAGED blob. The bytes of a record belong to the phase
//! that record starts. Channels without phase markers (multifd, TLS, unknown) take the phase
//! their owner gives them with [`StreamParser::follow_phase`]; the preempt channel and a
//! recovery channel are postcopy traffic.
//!
//! # Counters (checked against QEMU 7.2 `query-migrate` on real captures)
//! See [`RamCounters`] for the exact byte definitions. A migration's totals are the sums
//! over its connections; [`MultifdLedger`] corrects `normal` across multifd channels.

mod bytes;
mod main_stream;
mod multifd;
mod rp;
mod stepper;
pub mod wire;

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::time::Instant;

use main_stream::{MainParser, Mode};
use multifd::MultifdParser;
pub use multifd::{MultifdLedger, MultifdPacket};
pub use rp::ReturnPathParser;

/// Most header bytes any parser holds at once (record headers, idstrs, look-ahead).
pub const MAX_HEADER_BYTES: usize = 512;

/// Most events queued before the oldest unpolled ones are dropped (counted in
/// [`Stats::dropped_events`]). Drain with `poll_event()` after every `feed`.
pub const MAX_QUEUED_EVENTS: usize = 4096;

/// The migration phase a byte belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    /// Header, configuration, setup commands, START sections, early-setup FULL sections.
    Setup,
    /// Iterative pre-copy, from the first PART section; see [`Stats::passes`] for the pass.
    Precopy,
    /// Stop-and-copy: the source VM is stopped (precopy completion or postcopy switch,
    /// including the PACKAGED blob).
    Downtime,
    /// Post-copy: the guest runs on the destination, pages are pulled.
    Postcopy,
    /// Destination→source bytes (the return path).
    ReturnPath,
}

impl Phase {
    /// Every phase, in tally order.
    pub const ALL: [Phase; 5] = [
        Phase::Setup,
        Phase::Precopy,
        Phase::Downtime,
        Phase::Postcopy,
        Phase::ReturnPath,
    ];

    /// A short lower-case name, suitable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Setup => "setup",
            Phase::Precopy => "precopy",
            Phase::Downtime => "downtime",
            Phase::Postcopy => "postcopy",
            Phase::ReturnPath => "return_path",
        }
    }
}

/// What a connection carries, recognised from its first source→destination bytes
/// (docs/qemu-stream.md §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChannelKind {
    /// A fresh main channel (`QEVM` header).
    Main,
    /// A main channel re-opened for postcopy recovery: starts with RECV_BITMAP or
    /// POSTCOPY_RESUME, no header.
    Recovery,
    /// A multifd channel (`11 22 33 44`).
    Multifd,
    /// The postcopy preempt channel: bare RAM records.
    Preempt,
    /// TLS (`16 03 0x`): counted opaquely, any channel type.
    Tls,
    /// Anything else: counted opaquely.
    Unknown,
}

impl ChannelKind {
    /// A short lower-case name, suitable as a metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ChannelKind::Main => "main",
            ChannelKind::Recovery => "recovery",
            ChannelKind::Multifd => "multifd",
            ChannelKind::Preempt => "preempt",
            ChannelKind::Tls => "tls",
            ChannelKind::Unknown => "unknown",
        }
    }
}

/// Why a parser stopped understanding its input (and counts the rest as opaque).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DesyncReason {
    /// The channel is TLS: encrypted, counted opaquely.
    #[error("TLS channel: contents are encrypted")]
    Tls,
    /// The first bytes match no known channel kind.
    #[error("unrecognised channel start bytes")]
    UnknownChannel,
    /// The stream version after `QEVM` is not 3.
    #[error("unsupported stream version {0}")]
    BadVersion(u32),
    /// A configuration subsection this parser cannot size.
    #[error("unknown configuration subsection")]
    UnknownSubsection,
    /// A configuration field outside its valid range.
    #[error("invalid configuration section")]
    BadConfig,
    /// A top-level record type byte that is not valid here.
    #[error("unexpected record type {0:#04x}")]
    UnexpectedRecord(u8),
    /// A PART or END section whose id no START or FULL introduced.
    #[error("section id {0} was never introduced")]
    UnknownSection(u32),
    /// A section idstr that is empty or a header field out of range.
    #[error("malformed section header")]
    BadSectionHeader,
    /// A command number or length that is not valid.
    #[error("invalid command {cmd} with length {len}")]
    BadCommand {
        /// The command number.
        cmd: u16,
        /// Its announced payload length.
        len: u16,
    },
    /// A PACKAGED command inside a package.
    #[error("nested PACKAGED command")]
    NestedPackage,
    /// ENABLE_COLO: COLO checkpoints follow, out of scope.
    #[error("COLO stream: not parsed")]
    Colo,
    /// A RAM record word with an invalid flag combination.
    #[error("invalid RAM record flags in {0:#018x}")]
    BadRamFlags(u64),
    /// No page size in {4, 8, 16, 64} KiB fits the stream.
    #[error("no page size fits the RAM records")]
    PageSizeUnresolved,
    /// A zero-length block name, or a CONTINUE record with no previous block.
    #[error("malformed RAMBlock name")]
    BadBlockName,
    /// A MEM_SIZE block list whose lengths do not add up, or MEM_SIZE out of place.
    #[error("malformed MEM_SIZE block list")]
    BadMemSize,
    /// A ZERO record whose fill byte is not 0, or a bad XBZRLE/COMPRESS header.
    #[error("malformed RAM page record")]
    BadPageRecord,
    /// A section footer with the wrong id, or no footer where footers are in use.
    #[error("bad section footer")]
    BadFooter,
    /// A device section to skip while the stream has no footers to resync on.
    #[error("cannot skip a device section without section footers")]
    NoFooters,
    /// Bytes after the end of the stream (EOF, VMDESCRIPTION) or after RP SHUT.
    #[error("data after the end of the stream")]
    AfterEnd,
    /// Internal bound reached (look-ahead replay overflow); never expected.
    #[error("internal look-ahead limit reached")]
    Overflow,
    /// A multifd packet with a bad magic, version or page counts.
    #[error("malformed multifd packet")]
    BadMultifdPacket,
    /// A return-path message type or length that is not valid.
    #[error("invalid return-path message {kind} with length {len}")]
    BadRpMessage {
        /// The message type.
        kind: u16,
        /// Its announced payload length.
        len: u16,
    },
    /// A RECV_BITMAP trailer with a bad size or end mark.
    #[error("malformed RECV_BITMAP trailer")]
    BadBitmapTrailer,
}

/// How a connection's stream ended, as far as the parser can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `finish` has not been called yet.
    Running,
    /// The connection closed without a single byte (normal for an unused preempt channel).
    Empty,
    /// The stream ended cleanly: EOF (+VMDESCRIPTION) on a main channel, RP SHUT 0 on the
    /// return path, a packet boundary on a multifd or preempt channel.
    Completed,
    /// The connection closed mid-record, or before the stream's end marker.
    Truncated,
    /// The return path reported failure: SHUT with this non-zero code.
    Failed {
        /// The SHUT code.
        code: u32,
    },
    /// (Part of) the stream could not be parsed and was counted opaquely.
    Opaque(DesyncReason),
}

/// What happened, with the `now` of the `feed` call in which it was seen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Event {
    /// The `now` passed to the `feed` (or `finish`) call that produced the event.
    pub at: Instant,
    /// Stream offset (bytes since the connection's first byte) of the record concerned.
    pub offset: u64,
    /// What happened.
    pub kind: EventKind,
}

/// The discrete things a proxy may want to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The channel kind was recognised.
    Channel(ChannelKind),
    /// The phase changed; bytes from `offset` on belong to `to`.
    PhaseChanged {
        /// The phase before.
        from: Phase,
        /// The phase from `offset` on.
        to: Phase,
    },
    /// A pre-copy pass began (pass 1 at the first PART).
    PassStarted {
        /// 1-based pass number.
        pass: u32,
    },
    /// The page size became known (or was corrected after validation).
    PageSize(u32),
    /// The QEMU_VM_EOF record.
    Eof,
    /// A return-path PONG.
    Pong(u32),
    /// A postcopy page request on the return path (REQ_PAGES or REQ_PAGES_ID).
    PageRequest {
        /// Bytes requested.
        len: u32,
    },
    /// The return path's last message, SHUT, with its code (0 = success).
    Shut(u32),
    /// The parser gave up; the rest of the connection is counted as opaque.
    Desync(DesyncReason),
    /// A multifd packet with pages (for a [`MultifdLedger`]).
    MultifdPacket(MultifdPacket),
}

/// Bytes attributed to each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseBytes {
    /// Bytes in [`Phase::Setup`].
    pub setup: u64,
    /// Bytes in [`Phase::Precopy`].
    pub precopy: u64,
    /// Bytes in [`Phase::Downtime`].
    pub downtime: u64,
    /// Bytes in [`Phase::Postcopy`].
    pub postcopy: u64,
    /// Bytes in [`Phase::ReturnPath`].
    pub return_path: u64,
}

impl PhaseBytes {
    /// The bytes of one phase.
    pub fn get(&self, phase: Phase) -> u64 {
        match phase {
            Phase::Setup => self.setup,
            Phase::Precopy => self.precopy,
            Phase::Downtime => self.downtime,
            Phase::Postcopy => self.postcopy,
            Phase::ReturnPath => self.return_path,
        }
    }

    /// The sum over all phases.
    pub fn sum(&self) -> u64 {
        self.setup + self.precopy + self.downtime + self.postcopy + self.return_path
    }

    fn add(&mut self, phase: Phase, n: u64) {
        match phase {
            Phase::Setup => self.setup += n,
            Phase::Precopy => self.precopy += n,
            Phase::Downtime => self.downtime += n,
            Phase::Postcopy => self.postcopy += n,
            Phase::ReturnPath => self.return_path += n,
        }
    }
}

/// QEMU's RAM counters as `query-migrate` reports them, rebuilt from the wire.
///
/// Definitions (found by matching QEMU 7.2 captures to the byte):
/// * RAM record bytes are whole records: the be64 flags word, the idstr when CONTINUE is
///   clear, and the body (ZERO: 1 byte; PAGE: P; XBZRLE: 3 + n; COMPRESS: 4 + n).
/// * The EOS word (8 bytes) counts only when it closes a PART section (QEMU's
///   `ram_save_iterate`), not at the end of START, END or the preempt channel.
/// * Not counted: section headers and footers, the MEM_SIZE block list, MULTIFD_FLUSH,
///   commands, device state, EOF, VMDESCRIPTION.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RamCounters {
    /// QEMU `precopy-bytes`: RAM record bytes in PART sections while in [`Phase::Precopy`].
    pub precopy_bytes: u64,
    /// QEMU `downtime-bytes`: RAM record bytes of the END `ram` section in
    /// [`Phase::Downtime`] (its closing EOS excluded).
    pub downtime_bytes: u64,
    /// QEMU `postcopy-bytes`: RAM record bytes in PART/END sections after the package, plus
    /// the preempt channel's RAM records.
    pub postcopy_bytes: u64,
    /// QEMU `normal`: PAGE records, plus the pages of multifd packets. QEMU 7.2 counts a
    /// page it repeats across two multifd packets once: subtract
    /// [`MultifdLedger::repeated_pages`] from the sum over a migration's channels.
    pub normal_pages: u64,
    /// QEMU `duplicate`: ZERO records (and multifd zero pages, 9.0+).
    pub zero_pages: u64,
    /// XBZRLE records (QEMU `xbzrle-cache.pages`).
    pub xbzrle_pages: u64,
    /// COMPRESS_PAGE records (QEMU `compression.pages`).
    pub compressed_pages: u64,
    /// QEMU `multifd-bytes`: every multifd packet after the 64-byte initial packet,
    /// header (320 + 8·524288/P) plus payload.
    pub multifd_bytes: u64,
    /// Multifd packets seen (SYNC packets included).
    pub multifd_packets: u64,
    /// QEMU `postcopy-requests`: REQ_PAGES + REQ_PAGES_ID messages on the return path.
    pub page_requests: u64,
}

impl RamCounters {
    /// QEMU `transferred`: precopy + downtime + postcopy + multifd bytes.
    pub fn transferred(&self) -> u64 {
        self.precopy_bytes + self.downtime_bytes + self.postcopy_bytes + self.multifd_bytes
    }
}

/// Everything a parser has counted so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Bytes fed.
    pub total_bytes: u64,
    /// Bytes attributed to each phase. `phases.sum() + unattributed_bytes == total_bytes`.
    pub phases: PhaseBytes,
    /// Bytes whose phase is not decided yet: the start of a record header still being read
    /// (at most [`MAX_HEADER_BYTES`]); 0 after `finish`.
    pub unattributed_bytes: u64,
    /// Bytes counted without being understood (TLS, unknown channel, after a desync).
    /// They are also included in their phase's tally.
    pub opaque_bytes: u64,
    /// The target page size P once known (learned, assumed then validated, or given).
    pub page_size: Option<u32>,
    /// Pre-copy passes seen: 1 + wraps of the page scan (docs/qemu-stream.md §3.3); 0 before
    /// the first PART. Relation to QEMU 7.2's `dirty-sync-count` on the captures (one sync at
    /// setup, one per wrap, then the final ones): `passes + 2` for a precopy completion,
    /// `passes + 1` for a postcopy switch and for the multifd precopy capture.
    pub passes: u32,
    /// QEMU's RAM counters.
    pub ram: RamCounters,
    /// Guest RAM size announced by the MEM_SIZE list at setup (sum of the RAMBlocks'
    /// used lengths); 0 until seen.
    pub ram_total_bytes: u64,
    /// Events dropped because more than [`MAX_QUEUED_EVENTS`] were waiting.
    pub dropped_events: u64,
}

/// Shared accounting: tallies, phase, the event queue and the outcome bookkeeping.
#[derive(Debug)]
struct Core {
    stats: Stats,
    phase: Phase,
    /// Stream offset up to which bytes are attributed to a phase.
    tallied: u64,
    events: VecDeque<Event>,
    /// The `now` of the call in progress.
    now: Option<Instant>,
    desync: Option<DesyncReason>,
    finished: bool,
}

impl Core {
    fn new(phase: Phase) -> Self {
        Core {
            stats: Stats::default(),
            phase,
            tallied: 0,
            events: VecDeque::with_capacity(64),
            now: None,
            desync: None,
            finished: false,
        }
    }

    /// Attributes the bytes before `upto` (stream offset) to the current phase.
    fn attribute(&mut self, upto: u64) {
        if upto > self.tallied {
            self.stats.phases.add(self.phase, upto - self.tallied);
            self.tallied = upto;
        }
        self.stats.unattributed_bytes = self.stats.total_bytes - self.tallied;
    }

    /// Switches phase at stream offset `at`: earlier bytes stay with the old phase.
    fn set_phase(&mut self, phase: Phase, at: u64) {
        if phase == self.phase {
            return;
        }
        self.attribute(at);
        let from = self.phase;
        self.phase = phase;
        self.push(at, EventKind::PhaseChanged { from, to: phase });
    }

    fn push(&mut self, offset: u64, kind: EventKind) {
        let Some(at) = self.now else {
            return;
        };
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.stats.dropped_events += 1;
        }
        self.events.push_back(Event { at, offset, kind });
    }

    fn desync(&mut self, offset: u64, reason: DesyncReason) {
        if self.desync.is_none() {
            self.desync = Some(reason);
            self.push(offset, EventKind::Desync(reason));
        }
    }

    fn set_page_size(&mut self, offset: u64, p: u32) {
        if self.stats.page_size != Some(p) {
            self.stats.page_size = Some(p);
            self.push(offset, EventKind::PageSize(p));
        }
    }
}

/// Channel detection: the first bytes of a source→destination stream, before the kind is
/// known.
#[derive(Debug)]
enum Inner {
    Detecting { buf: [u8; 8], len: usize },
    Main(Box<MainParser>),
    Multifd(Box<MultifdParser>),
    Opaque,
}

/// Parser for the source→destination bytes of one connection (any channel kind).
#[derive(Debug)]
pub struct StreamParser {
    core: Core,
    inner: Inner,
    kind: Option<ChannelKind>,
    page_hint: Option<u32>,
    /// Set by `finish`: whether the stream stopped at a record boundary.
    clean_end: Option<bool>,
}

impl Default for StreamParser {
    fn default() -> Self {
        Self::new()
    }
}

impl StreamParser {
    /// A parser for a new connection; the channel kind is recognised from the first bytes.
    pub fn new() -> Self {
        StreamParser {
            core: Core::new(Phase::Setup),
            inner: Inner::Detecting {
                buf: [0; 8],
                len: 0,
            },
            kind: None,
            page_hint: None,
            clean_end: None,
        }
    }

    /// Tells the parser the target page size learned elsewhere (e.g. from the main
    /// channel), for channels that do not carry it: multifd packet headers are sized by it
    /// and a preempt channel starts from it. Ignored once this channel learned its own.
    pub fn set_page_size_hint(&mut self, page_size: u32) {
        if !page_size.is_power_of_two()
            || !(wire::MIN_PAGE_SIZE..=wire::MAX_PAGE_SIZE).contains(&page_size)
        {
            return;
        }
        self.page_hint = Some(page_size);
        if let Inner::Multifd(m) = &mut self.inner {
            m.set_page_size_hint(page_size);
        }
    }

    /// For channels without phase markers (multifd, TLS, unknown): bytes fed from now on
    /// belong to `phase` (typically the main channel's current phase). No effect on main,
    /// recovery and preempt channels, which know their own phase.
    pub fn follow_phase(&mut self, phase: Phase, now: Instant) {
        if matches!(
            self.kind,
            Some(ChannelKind::Main | ChannelKind::Recovery | ChannelKind::Preempt)
        ) || phase == Phase::ReturnPath
        {
            return;
        }
        self.core.now = Some(now);
        let at = self.core.stats.total_bytes;
        self.core.set_phase(phase, at);
    }

    /// Feeds the next bytes of the stream, in order. `now` stamps the events they produce.
    pub fn feed(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || self.core.finished {
            return;
        }
        self.core.now = Some(now);
        self.core.stats.total_bytes += bytes.len() as u64;
        let mut rest = bytes;
        if let Inner::Detecting { buf, len } = &mut self.inner {
            let take = (buf.len() - *len).min(rest.len());
            buf[*len..*len + take].copy_from_slice(&rest[..take]);
            *len += take;
            rest = &rest[take..];
            let (b, n) = (*buf, *len);
            match detect(&b[..n]) {
                None => {
                    self.core.attribute(0);
                    return;
                }
                Some(kind) => {
                    self.start(kind);
                    self.feed_inner(&b[..n]);
                }
            }
        }
        self.feed_inner(rest);
    }

    /// Whether the rest of this stream is opaque (TLS, an unknown protocol, or after a
    /// desync; opaque is final): its content is no longer looked at, only counted, so the
    /// caller may forward it without reading it (see [`StreamParser::feed_opaque`]).
    pub fn is_opaque(&self) -> bool {
        match &self.inner {
            Inner::Detecting { .. } => false,
            Inner::Main(m) => m.is_opaque(),
            Inner::Multifd(m) => m.is_opaque(),
            Inner::Opaque => true,
        }
    }

    /// Feeds `n` bytes the caller did not read, with the same effect as feeding them:
    /// only valid while [`StreamParser::is_opaque`], where content does not matter.
    pub fn feed_opaque(&mut self, mut n: usize, now: Instant) {
        static FILLER: [u8; 64 * 1024] = [0; 64 * 1024];
        debug_assert!(self.is_opaque());
        while n > 0 {
            let k = n.min(FILLER.len());
            self.feed(&FILLER[..k], now);
            n -= k;
        }
    }

    fn start(&mut self, kind: ChannelKind) {
        self.kind = Some(kind);
        self.core.push(0, EventKind::Channel(kind));
        self.inner = match kind {
            ChannelKind::Main => {
                // A phase set with `follow_phase` before classification does not apply.
                self.core.set_phase(Phase::Setup, 0);
                Inner::Main(Box::new(MainParser::new(Mode::Main, None)))
            }
            ChannelKind::Recovery => {
                self.core.set_phase(Phase::Postcopy, 0);
                Inner::Main(Box::new(MainParser::new(Mode::Recovery, self.page_hint)))
            }
            ChannelKind::Preempt => {
                self.core.set_phase(Phase::Postcopy, 0);
                Inner::Main(Box::new(MainParser::new(Mode::Preempt, self.page_hint)))
            }
            ChannelKind::Multifd => Inner::Multifd(Box::new(MultifdParser::new(self.page_hint))),
            ChannelKind::Tls => {
                self.core.desync(0, DesyncReason::Tls);
                Inner::Opaque
            }
            ChannelKind::Unknown => {
                self.core.desync(0, DesyncReason::UnknownChannel);
                Inner::Opaque
            }
        };
    }

    fn feed_inner(&mut self, bytes: &[u8]) {
        match &mut self.inner {
            Inner::Detecting { .. } => {}
            Inner::Main(m) => m.feed(&mut self.core, bytes),
            Inner::Multifd(m) => m.feed(&mut self.core, bytes),
            Inner::Opaque => {
                self.core.stats.opaque_bytes += bytes.len() as u64;
                let total = self.core.stats.total_bytes;
                self.core.attribute(total);
            }
        }
    }

    /// The connection's source→destination side closed (FIN or reset): attributes any
    /// pending header bytes and settles the [`Outcome`]. Bytes fed afterwards are ignored.
    pub fn finish(&mut self, now: Instant) {
        if self.core.finished {
            return;
        }
        self.core.now = Some(now);
        if let Inner::Detecting { buf, len } = self.inner {
            if len > 0 {
                // Too short to tell: classify what there is.
                let kind = detect_final(&buf[..len]);
                self.start(kind);
                self.feed_inner(&buf[..len]);
            }
        }
        let clean = match &mut self.inner {
            Inner::Detecting { .. } => true,
            Inner::Main(m) => m.finish(&mut self.core),
            Inner::Multifd(m) => m.at_boundary(),
            Inner::Opaque => true,
        };
        let total = self.core.stats.total_bytes;
        self.core.attribute(total);
        self.core.finished = true;
        self.core.stats.unattributed_bytes = 0;
        self.clean_end = Some(clean);
    }

    /// The channel kind, once recognised (after 4 to 8 bytes, or at `finish`).
    pub fn channel(&self) -> Option<ChannelKind> {
        self.kind
    }

    /// The phase the next byte will be attributed to (unless a record boundary changes it).
    pub fn phase(&self) -> Phase {
        self.core.phase
    }

    /// Counters and tallies so far.
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// The next queued event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.core.events.pop_front()
    }

    /// How the stream ended (or [`Outcome::Running`] before `finish`).
    pub fn outcome(&self) -> Outcome {
        if let Some(reason) = self.core.desync {
            return Outcome::Opaque(reason);
        }
        if !self.core.finished {
            return Outcome::Running;
        }
        if self.core.stats.total_bytes == 0 {
            return Outcome::Empty;
        }
        match (&self.inner, self.clean_end) {
            // A main or recovery channel ends with EOF; a preempt channel may stop anywhere
            // between records.
            (Inner::Main(m), Some(true)) if m.mode() != Mode::Preempt && !m.saw_eof() => {
                Outcome::Truncated
            }
            (_, Some(true)) => Outcome::Completed,
            _ => Outcome::Truncated,
        }
    }
}

/// Recognises the channel from its first bytes; `None` while more bytes are needed.
fn detect(b: &[u8]) -> Option<ChannelKind> {
    let n = b.len();
    if n == 0 {
        return None;
    }
    match b[0] {
        0x51 => prefix_kind(b, &[0x51, 0x45, 0x56, 0x4d], ChannelKind::Main),
        0x11 => prefix_kind(b, &[0x11, 0x22, 0x33, 0x44], ChannelKind::Multifd),
        0x16 => {
            if n >= 2 && b[1] != 0x03 {
                return Some(ChannelKind::Unknown);
            }
            if n >= 3 {
                return Some(if b[2] <= 0x04 {
                    ChannelKind::Tls
                } else {
                    ChannelKind::Unknown
                });
            }
            None
        }
        wire::QEMU_VM_COMMAND => {
            if n >= 2 && b[1] != 0 {
                return Some(ChannelKind::Unknown);
            }
            if n >= 3 {
                let cmd = u16::from(b[2]);
                return Some(
                    if cmd == wire::MIG_CMD_RECV_BITMAP || cmd == wire::MIG_CMD_POSTCOPY_RESUME {
                        ChannelKind::Recovery
                    } else {
                        ChannelKind::Unknown
                    },
                );
            }
            None
        }
        0x00 => {
            if n < 8 {
                return None;
            }
            let w = u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
            let f = w & wire::RAM_FLAGS_MASK;
            let page = f == wire::RAM_SAVE_FLAG_PAGE || f == wire::RAM_SAVE_FLAG_ZERO;
            Some(if page {
                ChannelKind::Preempt
            } else {
                ChannelKind::Unknown
            })
        }
        _ => Some(ChannelKind::Unknown),
    }
}

fn prefix_kind(b: &[u8], magic: &[u8; 4], kind: ChannelKind) -> Option<ChannelKind> {
    let n = b.len().min(4);
    if b[..n] != magic[..n] {
        return Some(ChannelKind::Unknown);
    }
    (n == 4).then_some(kind)
}

/// Classification of a connection that closed before `detect` could decide.
fn detect_final(b: &[u8]) -> ChannelKind {
    detect(b).unwrap_or(ChannelKind::Unknown)
}
