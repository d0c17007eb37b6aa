//! The resumable state machine for the main channel (with or without the `QEVM` header) and
//! for the postcopy preempt channel (bare RAM records).
//!
//! Headers are gathered by the shared [`Stepper`] into a fixed buffer of
//! [`MAX_HEADER_BYTES`]; bodies whose length is known (pages, XBZRLE and compressed pages,
//! the VMDESCRIPTION, the PACKAGED blob's end) are skipped by count. Device sections are
//! skipped by scanning for their footer ([`footer_scan`]). Any failure switches to opaque
//! mode for the rest of the connection.
//!
//! This file drives the input; each part of the grammar has its own file:
//! [`config`] (stream header and configuration section), [`records`] (top-level records,
//! section headers and footers), [`commands`] (commands and the PACKAGED blob), [`ram`] (the
//! RAM section payload), [`mem_size`] (the MEM_SIZE block list), [`page_size`] (where the
//! page size comes from and how a guess is checked), [`passes`] (pre-copy pass tracking) and
//! [`footer_scan`] (skipping device sections).

mod commands;
mod config;
mod footer_scan;
mod mem_size;
mod page_size;
mod passes;
mod ram;
mod records;

use super::stepper::{Step, Stepper, Want};
use super::{Core, DesyncReason, MAX_HEADER_BYTES};
use commands::CmdHdr;
use config::{ConfigHdr, SubHdr};
use footer_scan::{REPLAY_CAP, ScanHdr};
use mem_size::{Blocks, MemHdr};
use page_size::PageSource;
use passes::Passes;
use ram::{RamBody, RamHdr};
use records::{Footers, RecordHdr, Section, Sections};

/// Which stream grammar the parser starts in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// `QEVM` header, configuration, then records.
    Main,
    /// A recovery main channel: records (commands first), no header.
    Recovery,
    /// The preempt channel: bare RAM records.
    Preempt,
}

/// Declares [`Hdr`] and a `From` for each part's header type, from one list.
macro_rules! hdr {
    ($($variant:ident($ty:ty)),* $(,)?) => {
        /// Fixed-size headers gathered before acting, by the part of the grammar they
        /// belong to.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        enum Hdr {
            $($variant($ty),)*
        }

        $(impl From<$ty> for Hdr {
            fn from(h: $ty) -> Self {
                Hdr::$variant(h)
            }
        })*
    };
}

hdr!(
    Config(ConfigHdr),
    Sub(SubHdr),
    Record(RecordHdr),
    Cmd(CmdHdr),
    Ram(RamHdr),
    Mem(MemHdr),
    Scan(ScanHdr),
);

/// What follows a counted skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipNext {
    /// The body of a RAM record.
    Ram(RamBody),
    /// The VMDESCRIPTION JSON, the last record of a stream.
    VmdescEnd,
}

/// The main-channel / preempt-channel parser.
#[derive(Debug)]
pub(super) struct MainParser {
    mode: Mode,
    io: Stepper<Hdr, SkipNext>,
    /// Stream offset of the next byte the state machine consumes.
    pos: u64,
    /// Stream offset where the header being gathered began.
    unit: u64,
    /// Bytes from this offset on wait for a record's phase decision.
    hold: Option<u64>,
    replay: [u8; REPLAY_CAP],
    replay_len: usize,

    page_size: u32,
    page_src: PageSource,
    page_confirmed: bool,
    /// The next RAM word must validate the page size (after PAGE/XBZRLE).
    page_check: bool,
    /// Start of the last PAGE body, for page-size retries.
    page_body: u64,
    postcopy_advised: bool,
    ignore_shared: bool,
    footers: Footers,
    seen_part: bool,
    saw_eof: bool,
    ended: bool,

    sections: Sections,
    blocks: Blocks,
    passes: Passes,

    sec: Option<Section>,
    /// The current RAM record: start offset and flags.
    rec_start: u64,
    rec_flags: u64,
    rec_offset: u64,
    cur_block: Option<u16>,
    mem_total: u64,
    mem_sum: u64,
    pkg_end: Option<u64>,
    /// Offset of the command being read.
    cmd_start: u64,
}

impl MainParser {
    pub(super) fn new(mode: Mode, page_hint: Option<u32>) -> Self {
        let (page_size, page_src) = PageSource::initial(page_hint);
        let first = match mode {
            Mode::Main => Want::Header(8, ConfigHdr::Header.into()),
            Mode::Recovery => Want::Header(1, RecordHdr::TopType.into()),
            Mode::Preempt => Want::Header(8, RamHdr::Word.into()),
        };
        MainParser {
            mode,
            io: Stepper::new(first),
            pos: 0,
            unit: 0,
            hold: None,
            replay: [0; REPLAY_CAP],
            replay_len: 0,
            page_size,
            page_src,
            page_confirmed: false,
            page_check: false,
            page_body: 0,
            postcopy_advised: false,
            ignore_shared: false,
            footers: Footers::Unknown,
            seen_part: false,
            saw_eof: false,
            ended: false,
            sections: Sections::new(),
            blocks: Blocks::new(),
            passes: Passes::default(),
            sec: None,
            rec_start: 0,
            rec_flags: 0,
            rec_offset: 0,
            cur_block: None,
            mem_total: 0,
            mem_sum: 0,
            pkg_end: None,
            cmd_start: 0,
        }
    }

    pub(super) fn mode(&self) -> Mode {
        self.mode
    }

    pub(super) fn saw_eof(&self) -> bool {
        self.saw_eof
    }

    /// Opaque for good: the rest of the stream is only counted.
    pub(super) fn is_opaque(&self) -> bool {
        self.io.want() == Want::Opaque && self.replay_len == 0
    }

    /// Feeds bytes (already counted in `core.stats.total_bytes`).
    pub(super) fn feed(&mut self, core: &mut Core, data: &[u8]) {
        let mut i = 0;
        loop {
            self.replay(core);
            if i >= data.len() {
                break;
            }
            i += self.run(core, &data[i..]);
        }
        let upto = self.hold.unwrap_or(self.pos);
        core.attribute(upto);
    }

    /// Settles the stream at FIN. Returns whether it ended at a clean boundary.
    pub(super) fn finish(&mut self, core: &mut Core) -> bool {
        self.accept_final_footer(core);
        self.hold = None;
        core.attribute(self.pos);
        let boundary = self.io.gathered().is_empty();
        match self.io.want() {
            Want::Opaque => true,
            Want::Header(_, Hdr::Record(RecordHdr::TopType)) => boundary,
            // A preempt channel may end between RAM records.
            Want::Header(_, Hdr::Ram(RamHdr::Word)) => boundary && self.mode == Mode::Preempt,
            _ => false,
        }
    }

    /// Consumes from `data` until it is exhausted or a replay is scheduled; returns the
    /// number of bytes consumed.
    fn run(&mut self, core: &mut Core, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            if self.replay_len > 0 {
                return i;
            }
            // Inside a package, never read past its end.
            let mut avail = data.len() - i;
            if let Some(end) = self.pkg_end {
                let left = end.saturating_sub(self.pos);
                avail = avail.min(usize::try_from(left).unwrap_or(usize::MAX));
            }
            if avail == 0 {
                self.end_package(core);
                continue;
            }
            let chunk = &data[i..i + avail];
            let used = self.step(core, chunk);
            i += used;
            if self.pkg_end == Some(self.pos) {
                self.end_package(core);
            }
        }
        i
    }

    /// One state-machine step over `d` (non-empty unless a package just ended).
    fn step(&mut self, core: &mut Core, d: &[u8]) -> usize {
        if d.is_empty() {
            return 0;
        }
        if let Want::Header(_, Hdr::Ram(RamHdr::Word)) = self.io.want() {
            if self.io.gathered().is_empty() && !self.page_check {
                let used = self.fast_ram(core, d);
                if used > 0 {
                    return used;
                }
            }
        }
        let (used, step) = self.io.step(d);
        self.pos += used as u64;
        match step {
            Step::Pending => {}
            Step::Opaque => core.stats.opaque_bytes += used as u64,
            Step::Header(h) => self.on_hdr(core, h),
            Step::Body(SkipNext::Ram(body)) => self.after_ram_body(core, body),
            Step::Body(SkipNext::VmdescEnd) => self.vmdesc_end(core),
        }
        used
    }

    /// Handles a complete header, in `self.io.header()`.
    fn on_hdr(&mut self, core: &mut Core, h: Hdr) {
        match h {
            Hdr::Config(h) => self.on_config(core, h),
            Hdr::Sub(h) => self.on_subsection(core, h),
            Hdr::Record(h) => self.on_record(core, h),
            Hdr::Cmd(h) => self.on_cmd(core, h),
            Hdr::Ram(h) => self.on_ram(core, h),
            Hdr::Mem(h) => self.on_mem_size(core, h),
            Hdr::Scan(h) => self.on_scan(core, h),
        }
    }

    /// Gathers `n` header bytes, then handles them as `h` (at once when `n` is 0).
    fn need(&mut self, core: &mut Core, n: usize, h: impl Into<Hdr>) {
        let h = h.into();
        self.unit = self.pos;
        if n > MAX_HEADER_BYTES {
            self.go_opaque(core, DesyncReason::Overflow);
            return;
        }
        self.io.gather(n, h);
        if n == 0 {
            self.on_hdr(core, h);
        }
    }

    fn go_opaque(&mut self, core: &mut Core, reason: DesyncReason) {
        // The bytes of the header that failed are opaque too.
        core.stats.opaque_bytes += self.pos.saturating_sub(self.unit);
        core.desync(self.unit, reason);
        self.io.opaque();
        self.hold = None;
    }
}
