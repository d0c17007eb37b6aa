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
//!
//! # Layout
//! `stream.rs` recognises the channel and hands its bytes on; `main_stream/` parses main,
//! recovery and preempt channels (one file per part of the grammar), `multifd.rs` multifd
//! channels and `rp.rs` the return path. All three take their input through `stepper.rs`
//! (gather a header across any splits, skip a body by count). `accounting.rs` holds the
//! tallies, phase and events they share, `wire.rs` the wire constants and `bytes.rs` the
//! field readers.

mod accounting;
mod bytes;
mod main_stream;
mod multifd;
mod rp;
mod stepper;
mod stream;
pub mod wire;

#[cfg(test)]
mod tests;

use std::time::Instant;

use accounting::Core;
pub use multifd::{MultifdLedger, MultifdPacket};
pub use rp::ReturnPathParser;
pub use stream::StreamParser;

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

    /// The phases a migration passes through, in order: the return path is not one of
    /// them (its bytes count in the main channel's phase at the time they pass). The label
    /// values of the `phase` metrics and the keys of a record's per-phase maps.
    pub const MIGRATION: [Phase; 4] = [
        Phase::Setup,
        Phase::Precopy,
        Phase::Downtime,
        Phase::Postcopy,
    ];

    /// The phase's place in [`Phase::ALL`]; the migration phases come first, so it also
    /// indexes [`Phase::MIGRATION`].
    pub fn index(self) -> usize {
        match self {
            Phase::Setup => 0,
            Phase::Precopy => 1,
            Phase::Downtime => 2,
            Phase::Postcopy => 3,
            Phase::ReturnPath => 4,
        }
    }

    /// The migration phase a byte of this phase is booked under: itself, and post-copy
    /// for the return path (which only a return-path parser reports).
    pub fn migration_phase(self) -> Phase {
        match self {
            Phase::ReturnPath => Phase::Postcopy,
            p => p,
        }
    }

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
    /// Every kind, in the order of the `channel` metric label values.
    pub const ALL: [ChannelKind; 6] = [
        ChannelKind::Main,
        ChannelKind::Multifd,
        ChannelKind::Preempt,
        ChannelKind::Recovery,
        ChannelKind::Tls,
        ChannelKind::Unknown,
    ];

    /// The kind's place in [`ChannelKind::ALL`].
    pub fn index(self) -> usize {
        match self {
            ChannelKind::Main => 0,
            ChannelKind::Multifd => 1,
            ChannelKind::Preempt => 2,
            ChannelKind::Recovery => 3,
            ChannelKind::Tls => 4,
            ChannelKind::Unknown => 5,
        }
    }

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
