//! The resumable state machine for the main channel (with or without the `QEVM` header) and
//! for the postcopy preempt channel (bare RAM records).
//!
//! Headers are gathered into a fixed buffer of [`MAX_HEADER_BYTES`]; bodies whose length is
//! known (pages, XBZRLE and compressed pages, the VMDESCRIPTION, the PACKAGED blob's end) are
//! skipped by count. Device sections (FULL, and START/PART/END of iterables other than
//! `ram`) are skipped by scanning for their footer (doc §5); the few bytes read ahead to
//! validate a footer candidate are replayed through the state machine, from a fixed buffer.
//! Any failure switches to opaque mode for the rest of the connection.

use super::stepper::{Step, Stepper, Want};
use super::wire::*;
use super::{Core, DesyncReason, EventKind, MAX_HEADER_BYTES, Phase};

/// Most distinct section ids remembered (START/FULL); later ones are unknown.
const MAX_SECTIONS: usize = 256;
/// Most RAMBlocks remembered from the MEM_SIZE list for pass ordering.
const MAX_BLOCKS: usize = 64;
/// Block index used for RAM records whose block is not in the MEM_SIZE list.
const UNLISTED_BLOCK: u16 = MAX_BLOCKS as u16;
/// Room for replayed look-ahead bytes (footer candidates are at most ~280 bytes).
const REPLAY_CAP: usize = 2 * MAX_HEADER_BYTES;
/// `08`, be16 cmd, be16 len.
const CMD_HEADER_BYTES: usize = 5;

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

/// Where the page size came from; a better source overrides a weaker one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum PageSource {
    Default,
    Hint,
    Machine,
    Advise,
    Config,
}

/// Whether the stream closes sections with footers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Footers {
    Unknown,
    Yes,
    No,
}

/// The kind of the section being parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SecType {
    Start,
    Part,
    End,
    Full,
}

/// The section being parsed.
#[derive(Debug, Clone, Copy)]
struct Section {
    id: u32,
    ty: SecType,
}

/// Fixed-size headers gathered before acting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hdr {
    /// Magic + version (8).
    Header,
    /// First byte after the header: `07` or a record type.
    ConfigPeek,
    ConfigLen,
    ConfigName,
    /// Next byte: `05` (another subsection) or a record type.
    SubPeek,
    SubNameLen,
    SubName,
    SubPageBits,
    SubCapCount,
    SubCapLen(u32),
    SubCapName(u32),
    SubUuid,
    /// A top-level record type byte.
    TopType,
    /// START/FULL: be32 id + idstr length.
    SecFullHead(SecType),
    /// START/FULL: idstr + be32 instance + be32 version.
    SecFullRest(SecType, u32),
    /// PART/END: be32 id.
    SecId(SecType),
    CmdHead,
    CmdBody(u16),
    VmdescLen,
    RamW,
    RamIdLen,
    RamId,
    ZeroByte,
    XbzHead,
    CompLen,
    MemIdLen,
    MemIdRest,
    MemPeek,
    MemPageSizeRest,
    MemLastV,
    MemGaddr,
    FooterPeek,
    FooterId,
    /// Device section body: a footer mark found while scanning for section `id`.
    FooterMark(u32),
    /// A footer candidate for section `id`, being validated.
    Cand(u32),
}

/// What follows a counted skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SkipNext {
    PageEnd,
    XbzEnd,
    CompEnd,
    /// Extra bytes of a page after a page-size correction: then re-read the word.
    PageRetry,
    VmdescEnd,
}

/// Result of validating a footer candidate.
enum Cand {
    More(usize),
    Accept,
    Reject,
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

    sections: [(u32, bool); MAX_SECTIONS],
    nsections: usize,
    blocks: [u64; MAX_BLOCKS],
    nblocks: usize,

    sec: Option<Section>,
    sec_is_ram: bool,
    /// The current RAM record: start offset and flags.
    rec_start: u64,
    rec_flags: u64,
    rec_offset: u64,
    cur_block: Option<u16>,
    mem_total: u64,
    mem_sum: u64,
    last_page: Option<(u16, u64)>,
    wrap_pending: bool,
    pkg_end: Option<u64>,
    /// Offset of the command being read.
    cmd_start: u64,
}

/// FNV-1a, to remember block names in fixed space.
pub(super) fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// Splits a RAM word into (main flag, CONTINUE) if its flag bits are a valid combination
/// for page size `p`.
fn ram_flags(w: u64, p: u32) -> Option<(u64, bool)> {
    let f = w & (u64::from(p) - 1);
    if f & !RAM_FLAGS_MASK != 0 {
        return None;
    }
    let cont = f & RAM_SAVE_FLAG_CONTINUE != 0;
    let main = f & !RAM_SAVE_FLAG_CONTINUE;
    let ok = match main {
        RAM_SAVE_FLAG_ZERO
        | RAM_SAVE_FLAG_PAGE
        | RAM_SAVE_FLAG_XBZRLE
        | RAM_SAVE_FLAG_COMPRESS_PAGE => true,
        RAM_SAVE_FLAG_MEM_SIZE | RAM_SAVE_FLAG_EOS | RAM_SAVE_FLAG_MULTIFD_FLUSH => !cont,
        _ => false,
    };
    ok.then_some((main, cont))
}

/// Page size implied by a machine type (doc §3.2 step 3).
fn machine_page_size(name: &[u8]) -> u32 {
    let starts = |p: &[u8]| name.starts_with(p);
    if starts(b"clipper") || starts(b"sun4u") || starts(b"sun4v") || starts(b"niagara") {
        8192
    } else {
        DEFAULT_PAGE_SIZE
    }
}

impl MainParser {
    pub(super) fn new(mode: Mode, page_hint: Option<u32>) -> Self {
        let (page_size, page_src) = match page_hint {
            Some(p) => (p, PageSource::Hint),
            None => (DEFAULT_PAGE_SIZE, PageSource::Default),
        };
        let first = match mode {
            Mode::Main => Want::Header(8, Hdr::Header),
            Mode::Recovery => Want::Header(1, Hdr::TopType),
            Mode::Preempt => Want::Header(8, Hdr::RamW),
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
            sections: [(0, false); MAX_SECTIONS],
            nsections: 0,
            blocks: [0; MAX_BLOCKS],
            nblocks: 0,
            sec: None,
            sec_is_ram: false,
            rec_start: 0,
            rec_flags: 0,
            rec_offset: 0,
            cur_block: None,
            mem_total: 0,
            mem_sum: 0,
            last_page: None,
            wrap_pending: false,
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
            while self.replay_len > 0 {
                let mut tmp = [0u8; REPLAY_CAP];
                let n = self.replay_len;
                tmp[..n].copy_from_slice(&self.replay[..n]);
                self.replay_len = 0;
                let used = self.run(core, &tmp[..n]);
                let rest = &tmp[used..n];
                if !rest.is_empty() {
                    // Newly scheduled replay bytes come first, then the rest of this one.
                    if self.replay_len + rest.len() > REPLAY_CAP {
                        self.replay_len = 0;
                        self.go_opaque(core, DesyncReason::Overflow);
                        // Those bytes were already counted as fed; they are opaque now.
                        core.stats.opaque_bytes += rest.len() as u64;
                        self.pos += rest.len() as u64;
                        break;
                    }
                    self.replay[self.replay_len..self.replay_len + rest.len()]
                        .copy_from_slice(rest);
                    self.replay_len += rest.len();
                }
            }
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
        if let Want::Header(7, Hdr::Cand(_)) = self.io.want() {
            let got = self.io.gathered();
            if got.len() == 6 && got[5] == QEMU_VM_EOF {
                // Footer + EOF as the very last bytes (no VMDESCRIPTION): accept them.
                self.top_record(core, QEMU_VM_EOF);
            }
        }
        self.hold = None;
        core.attribute(self.pos);
        let boundary = self.io.gathered().is_empty();
        match self.io.want() {
            Want::Opaque => true,
            Want::Header(_, Hdr::TopType) => boundary,
            // A preempt channel may end between RAM records.
            Want::Header(_, Hdr::RamW) => boundary && self.mode == Mode::Preempt,
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
        if let Want::Header(_, Hdr::RamW) = self.io.want() {
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
            Step::Body(next) => self.after_skip(core, next),
        }
        used
    }

    /// Gathers `n` header bytes, then handles them as `h` (at once when `n` is 0).
    fn need(&mut self, core: &mut Core, n: usize, h: Hdr) {
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

    fn schedule_replay(&mut self, core: &mut Core, from: usize) {
        let rest = &self.io.header()[from..];
        let n = rest.len();
        if n > REPLAY_CAP {
            self.go_opaque(core, DesyncReason::Overflow);
            return;
        }
        self.replay[..n].copy_from_slice(rest);
        self.replay_len = n;
        self.pos -= n as u64;
    }

    fn top(&mut self, core: &mut Core) {
        self.sec = None;
        self.need(core, 1, Hdr::TopType);
    }

    fn ram_word(&mut self, core: &mut Core) {
        self.need(core, 8, Hdr::RamW);
    }

    fn known_section(&self, id: u32) -> Option<bool> {
        self.sections[..self.nsections]
            .iter()
            .find(|(sid, _)| *sid == id)
            .map(|&(_, ram)| ram)
    }

    fn register_section(&mut self, id: u32, ram: bool) {
        if let Some(e) = self.sections[..self.nsections]
            .iter_mut()
            .find(|(sid, _)| *sid == id)
        {
            e.1 = ram;
        } else if self.nsections < MAX_SECTIONS {
            self.sections[self.nsections] = (id, ram);
            self.nsections += 1;
        }
    }

    fn block_index(&self, h: u64) -> u16 {
        self.blocks[..self.nblocks]
            .iter()
            .position(|&b| b == h)
            .map_or(UNLISTED_BLOCK, |i| i as u16)
    }

    fn set_page(&mut self, core: &mut Core, p: u32, src: PageSource) {
        if src >= self.page_src
            && p.is_power_of_two()
            && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&p)
        {
            self.page_size = p;
            self.page_src = src;
            core.set_page_size(self.unit, p);
        }
    }

    /// Handles a complete header, in `self.io.header()`.
    fn on_hdr(&mut self, core: &mut Core, h: Hdr) {
        let n = self.io.header().len();
        match h {
            Hdr::Header => {
                let version = be32(&self.io.header()[4..8]);
                if be32(&self.io.header()[..4]) != QEMU_VM_FILE_MAGIC {
                    self.go_opaque(core, DesyncReason::UnknownChannel);
                } else if version != QEMU_VM_FILE_VERSION {
                    self.go_opaque(core, DesyncReason::BadVersion(version));
                } else {
                    self.need(core, 1, Hdr::ConfigPeek);
                }
            }
            Hdr::ConfigPeek => {
                if self.io.header()[0] == QEMU_VM_CONFIGURATION {
                    self.need(core, 4, Hdr::ConfigLen);
                } else {
                    self.top_record(core, self.io.header()[0]);
                }
            }
            Hdr::ConfigLen => {
                let len = be32(&self.io.header()[..4]);
                if len as usize > 255 {
                    self.go_opaque(core, DesyncReason::BadConfig);
                } else {
                    self.need(core, len as usize, Hdr::ConfigName);
                }
            }
            Hdr::ConfigName => {
                let p = machine_page_size(self.io.header());
                self.set_page(core, p, PageSource::Machine);
                self.need(core, 1, Hdr::SubPeek);
            }
            Hdr::SubPeek => {
                if self.io.header()[0] == QEMU_VM_SUBSECTION {
                    self.need(core, 1, Hdr::SubNameLen);
                } else {
                    self.top_record(core, self.io.header()[0]);
                }
            }
            Hdr::SubNameLen => {
                let len = usize::from(self.io.header()[0]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::UnknownSubsection);
                } else {
                    self.need(core, len + 4, Hdr::SubName);
                }
            }
            Hdr::SubName => {
                let name = &self.io.header()[..n - 4];
                if name == CONFIG_TARGET_PAGE_BITS {
                    self.need(core, 4, Hdr::SubPageBits);
                } else if name == CONFIG_CAPABILITIES {
                    self.need(core, 4, Hdr::SubCapCount);
                } else if name == CONFIG_UUID {
                    self.need(core, 16, Hdr::SubUuid);
                } else {
                    self.go_opaque(core, DesyncReason::UnknownSubsection);
                }
            }
            Hdr::SubPageBits => {
                let bits = be32(&self.io.header()[..4]);
                if !(10..=16).contains(&bits) {
                    self.go_opaque(core, DesyncReason::BadConfig);
                } else {
                    self.set_page(core, 1 << bits, PageSource::Config);
                    self.need(core, 1, Hdr::SubPeek);
                }
            }
            Hdr::SubCapCount => {
                let count = be32(&self.io.header()[..4]);
                if count > 64 {
                    self.go_opaque(core, DesyncReason::BadConfig);
                } else if count == 0 {
                    self.need(core, 1, Hdr::SubPeek);
                } else {
                    self.need(core, 1, Hdr::SubCapLen(count));
                }
            }
            Hdr::SubCapLen(left) => {
                let len = usize::from(self.io.header()[0]);
                self.need(core, len, Hdr::SubCapName(left));
            }
            Hdr::SubCapName(left) => {
                if self.io.header() == CAP_X_IGNORE_SHARED {
                    self.ignore_shared = true;
                }
                if left <= 1 {
                    self.need(core, 1, Hdr::SubPeek);
                } else {
                    self.need(core, 1, Hdr::SubCapLen(left - 1));
                }
            }
            Hdr::SubUuid => self.need(core, 1, Hdr::SubPeek),
            Hdr::TopType => self.top_record(core, self.io.header()[0]),
            Hdr::SecFullHead(ty) => {
                let id = be32(&self.io.header()[..4]);
                let len = usize::from(self.io.header()[4]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::BadSectionHeader);
                } else {
                    self.need(core, len + 8, Hdr::SecFullRest(ty, id));
                }
            }
            Hdr::SecFullRest(ty, id) => {
                let is_ram = &self.io.header()[..n - 8] == RAM_IDSTR;
                self.register_section(id, is_ram);
                self.open_section(core, id, ty, is_ram);
            }
            Hdr::SecId(ty) => {
                let id = be32(&self.io.header()[..4]);
                let ram = match self.known_section(id) {
                    Some(ram) => ram,
                    // A recovery channel continues sections introduced on the old channel;
                    // only `ram` has PART/END there.
                    None if self.mode == Mode::Recovery => {
                        self.register_section(id, true);
                        true
                    }
                    None => {
                        self.go_opaque(core, DesyncReason::UnknownSection(id));
                        return;
                    }
                };
                self.open_section(core, id, ty, ram);
            }
            Hdr::CmdHead => {
                let cmd = be16(&self.io.header()[..2]);
                let len = be16(&self.io.header()[2..4]);
                let bad = match cmd {
                    0 => true,
                    MIG_CMD_PACKAGED => len != PACKAGED_LEN,
                    // The command's 5 header bytes are held with its body until the
                    // command is understood, and everything held fits MAX_HEADER_BYTES.
                    // QEMU's largest command (a DISCARD: 2 + 255 + 1 + 12 x 16 bytes) is
                    // well below.
                    _ => usize::from(len) > MAX_HEADER_BYTES - CMD_HEADER_BYTES,
                };
                if bad {
                    self.go_opaque(core, DesyncReason::BadCommand { cmd, len });
                } else {
                    self.need(core, usize::from(len), Hdr::CmdBody(cmd));
                }
            }
            Hdr::CmdBody(cmd) => self.on_command(core, cmd, n),
            Hdr::VmdescLen => {
                let len = be32(&self.io.header()[..4]);
                self.hold = None;
                self.io.skip(u64::from(len), SkipNext::VmdescEnd);
                if len == 0 {
                    self.after_skip(core, SkipNext::VmdescEnd);
                }
            }
            Hdr::RamW => {
                let w = be64(&self.io.header()[..8]);
                self.rec_start = self.pos - 8;
                self.on_ram_word(core, w);
            }
            Hdr::RamIdLen => {
                let len = usize::from(self.io.header()[0]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::BadBlockName);
                } else {
                    self.need(core, len, Hdr::RamId);
                }
            }
            Hdr::RamId => {
                let h = name_hash(self.io.header());
                self.cur_block = Some(self.block_index(h));
                self.ram_body(core);
            }
            Hdr::ZeroByte => {
                if self.io.header()[0] != 0 {
                    self.go_opaque(core, DesyncReason::BadPageRecord);
                } else {
                    core.stats.ram.zero_pages += 1;
                    self.count_ram(core, self.pos - self.rec_start);
                    self.ram_word(core);
                }
            }
            Hdr::XbzHead => {
                let len = be16(&self.io.header()[1..3]);
                if self.io.header()[0] != ENCODING_FLAG_XBZRLE || u32::from(len) > self.page_size {
                    self.go_opaque(core, DesyncReason::BadPageRecord);
                } else {
                    self.io.skip(u64::from(len), SkipNext::XbzEnd);
                    if len == 0 {
                        self.after_skip(core, SkipNext::XbzEnd);
                    }
                }
            }
            Hdr::CompLen => {
                let len = be32(&self.io.header()[..4]);
                if u64::from(len) > 2 * u64::from(self.page_size) + 1024 {
                    self.go_opaque(core, DesyncReason::BadPageRecord);
                } else {
                    self.io.skip(u64::from(len), SkipNext::CompEnd);
                    if len == 0 {
                        self.after_skip(core, SkipNext::CompEnd);
                    }
                }
            }
            Hdr::MemIdLen => {
                let len = usize::from(self.io.header()[0]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::BadMemSize);
                } else {
                    self.need(core, len + 8, Hdr::MemIdRest);
                }
            }
            Hdr::MemIdRest => {
                let name_len = n - 8;
                let h = name_hash(&self.io.header()[..name_len]);
                let used = be64(&self.io.header()[name_len..n]);
                if self.nblocks < MAX_BLOCKS {
                    self.blocks[self.nblocks] = h;
                    self.nblocks += 1;
                }
                self.mem_sum = self.mem_sum.saturating_add(used);
                if self.mem_sum > self.mem_total {
                    self.go_opaque(core, DesyncReason::BadMemSize);
                } else if self.ignore_shared {
                    self.need(core, 8, Hdr::MemGaddr);
                } else if self.postcopy_advised {
                    if self.mem_sum < self.mem_total {
                        self.need(core, 1, Hdr::MemPeek);
                    } else {
                        self.need(core, 8, Hdr::MemLastV);
                    }
                } else {
                    self.next_block(core);
                }
            }
            Hdr::MemGaddr | Hdr::MemPageSizeRest => self.next_block(core),
            Hdr::MemPeek => {
                if self.io.header()[0] == 0 {
                    self.need(core, 7, Hdr::MemPageSizeRest);
                } else {
                    // It was the next block's name length.
                    let len = usize::from(self.io.header()[0]);
                    self.need(core, len + 8, Hdr::MemIdRest);
                }
            }
            Hdr::MemLastV => {
                let v = be64(&self.io.header()[..8]);
                if v.is_power_of_two() && v >= 0x400 {
                    self.ram_word(core);
                } else {
                    // No page-size field: this is the next record's word.
                    self.rec_start = self.pos - 8;
                    self.on_ram_word(core, v);
                }
            }
            Hdr::FooterPeek => {
                let b = self.io.header()[0];
                if b == QEMU_VM_SECTION_FOOTER {
                    self.footers = Footers::Yes;
                    self.need(core, 4, Hdr::FooterId);
                } else if self.footers == Footers::Yes {
                    self.go_opaque(core, DesyncReason::BadFooter);
                } else {
                    self.footers = Footers::No;
                    self.sec = None;
                    self.top_record(core, b);
                }
            }
            Hdr::FooterId => {
                let id = be32(&self.io.header()[..4]);
                if self.sec.map(|s| s.id) != Some(id) {
                    self.go_opaque(core, DesyncReason::BadFooter);
                } else {
                    self.top(core);
                }
            }
            Hdr::FooterMark(id) => {
                self.unit = self.pos - 1;
                self.hold = Some(self.unit);
                self.io.gather_more(5, Hdr::Cand(id));
            }
            Hdr::Cand(id) => self.check_candidate(core, id),
        }
    }

    fn next_block(&mut self, core: &mut Core) {
        if self.mem_sum < self.mem_total {
            self.need(core, 1, Hdr::MemIdLen);
        } else {
            self.ram_word(core);
        }
    }

    /// A top-level record starts with type byte `t` (already consumed).
    fn top_record(&mut self, core: &mut Core, t: u8) {
        let start = self.pos - 1;
        self.unit = start;
        self.sec = None;
        if self.ended || (self.saw_eof && t != QEMU_VM_VMDESCRIPTION) {
            self.go_opaque(core, DesyncReason::AfterEnd);
            return;
        }
        let before_downtime = matches!(core.phase, Phase::Setup | Phase::Precopy);
        match t {
            QEMU_VM_EOF => {
                if before_downtime {
                    core.set_phase(Phase::Downtime, start);
                }
                core.push(start, EventKind::Eof);
                self.saw_eof = true;
                if core.phase == Phase::Postcopy {
                    self.ended = true;
                }
                self.hold = None;
                self.top(core);
            }
            QEMU_VM_SECTION_START => {
                self.hold = None;
                self.need(core, 5, Hdr::SecFullHead(SecType::Start));
                self.unit = start;
            }
            QEMU_VM_SECTION_FULL => {
                if self.seen_part && core.phase == Phase::Precopy {
                    core.set_phase(Phase::Downtime, start);
                }
                self.hold = None;
                self.need(core, 5, Hdr::SecFullHead(SecType::Full));
                self.unit = start;
            }
            QEMU_VM_SECTION_PART => {
                if core.phase == Phase::Setup {
                    core.set_phase(Phase::Precopy, start);
                }
                if !self.seen_part && core.phase == Phase::Precopy {
                    core.stats.passes = 1;
                    core.push(start, EventKind::PassStarted { pass: 1 });
                }
                self.seen_part = true;
                self.hold = None;
                self.need(core, 4, Hdr::SecId(SecType::Part));
                self.unit = start;
            }
            QEMU_VM_SECTION_END => {
                if before_downtime {
                    core.set_phase(Phase::Downtime, start);
                }
                self.hold = None;
                self.need(core, 4, Hdr::SecId(SecType::End));
                self.unit = start;
            }
            QEMU_VM_VMDESCRIPTION => {
                self.hold = None;
                self.need(core, 4, Hdr::VmdescLen);
                self.unit = start;
            }
            QEMU_VM_COMMAND => {
                self.hold = Some(start);
                self.cmd_start = start;
                self.need(core, 4, Hdr::CmdHead);
                self.unit = start;
            }
            _ => {
                self.hold = None;
                self.go_opaque(core, DesyncReason::UnexpectedRecord(t));
            }
        }
    }

    fn open_section(&mut self, core: &mut Core, id: u32, ty: SecType, ram: bool) {
        self.sec = Some(Section { id, ty });
        self.sec_is_ram = ram;
        if ram && ty != SecType::Full {
            // The CONTINUE state ("last sent block") carries over from section to section.
            self.ram_word(core);
        } else if self.footers == Footers::No {
            // The header parsed; the body is what cannot be skipped.
            self.unit = self.pos;
            self.go_opaque(core, DesyncReason::NoFooters);
        } else {
            self.io.find(QEMU_VM_SECTION_FOOTER, Hdr::FooterMark(id));
        }
    }

    fn on_command(&mut self, core: &mut Core, cmd: u16, n: usize) {
        let start = self.cmd_start;
        let before_downtime = matches!(core.phase, Phase::Setup | Phase::Precopy);
        match cmd {
            MIG_CMD_PING if n == 4 => {
                let v = be32(&self.io.header()[..4]);
                if v == PING_BEFORE_PACKAGE && self.postcopy_advised && before_downtime {
                    core.set_phase(Phase::Downtime, start);
                }
            }
            MIG_CMD_POSTCOPY_ADVISE if n == usize::from(ADVISE_RAM_LEN) => {
                self.postcopy_advised = true;
                let p = be64(&self.io.header()[8..16]);
                if let Ok(p) = u32::try_from(p) {
                    self.set_page(core, p, PageSource::Advise);
                }
            }
            MIG_CMD_POSTCOPY_RAM_DISCARD | MIG_CMD_SWITCHOVER_START if before_downtime => {
                core.set_phase(Phase::Downtime, start);
            }
            MIG_CMD_PACKAGED => {
                if self.pkg_end.is_some() {
                    self.go_opaque(core, DesyncReason::NestedPackage);
                    return;
                }
                if before_downtime {
                    core.set_phase(Phase::Downtime, start);
                }
                let len = be32(&self.io.header()[..4]);
                self.hold = None;
                self.pkg_end = Some(self.pos + u64::from(len));
                self.top(core);
                if len == 0 {
                    self.end_package(core);
                }
                return;
            }
            MIG_CMD_ENABLE_COLO => {
                self.hold = None;
                self.unit = self.pos;
                self.go_opaque(core, DesyncReason::Colo);
                return;
            }
            _ => {}
        }
        self.hold = None;
        self.top(core);
    }

    /// The PACKAGED blob ended: back to the main stream, in postcopy.
    fn end_package(&mut self, core: &mut Core) {
        self.pkg_end = None;
        self.hold = None;
        if self.io.want() == Want::Opaque {
            core.set_phase(Phase::Postcopy, self.pos);
            return;
        }
        core.set_phase(Phase::Postcopy, self.pos);
        self.top(core);
    }

    fn on_ram_word(&mut self, core: &mut Core, w: u64) {
        if self.page_check {
            if ram_flags(w, self.page_size).is_none() && !self.page_confirmed {
                // The page was longer than assumed: try the next candidate size.
                let next = PAGE_SIZE_CANDIDATES
                    .iter()
                    .copied()
                    .find(|&p| p > self.page_size);
                match next {
                    Some(p) => {
                        let extra = u64::from(p - self.page_size);
                        // The word we read sits `page_size` after the body start; the real
                        // one sits `p` after it.
                        let skip = (self.page_body + u64::from(p)).saturating_sub(self.pos);
                        self.count_ram(core, extra);
                        self.page_size = p;
                        self.page_src = PageSource::Default;
                        self.io.skip(skip, SkipNext::PageRetry);
                        return;
                    }
                    None => {
                        self.go_opaque(core, DesyncReason::PageSizeUnresolved);
                        return;
                    }
                }
            }
            self.page_check = false;
            if !self.page_confirmed {
                self.page_confirmed = true;
                core.set_page_size(self.rec_start, self.page_size);
            }
        }
        let Some((flag, cont)) = ram_flags(w, self.page_size) else {
            self.go_opaque(core, DesyncReason::BadRamFlags(w));
            return;
        };
        self.rec_flags = flag;
        self.rec_offset = w & !(u64::from(self.page_size) - 1);
        match flag {
            RAM_SAVE_FLAG_EOS => {
                if self.mode == Mode::Preempt {
                    self.ram_word(core);
                    return;
                }
                if self.sec.map(|s| s.ty) == Some(SecType::Part) {
                    self.count_ram(core, 8);
                }
                self.need(core, 1, Hdr::FooterPeek);
            }
            RAM_SAVE_FLAG_MEM_SIZE => {
                if self.sec.map(|s| s.ty) != Some(SecType::Start) || self.mem_total != 0 {
                    self.go_opaque(core, DesyncReason::BadMemSize);
                    return;
                }
                self.mem_total = w & !RAM_FLAGS_MASK;
                core.stats.ram_total_bytes = self.mem_total;
                self.mem_sum = 0;
                if self.mem_total == 0 {
                    self.ram_word(core);
                } else {
                    self.need(core, 1, Hdr::MemIdLen);
                }
            }
            RAM_SAVE_FLAG_MULTIFD_FLUSH => {
                if self.sec.map(|s| s.ty) == Some(SecType::Part) && core.phase == Phase::Precopy {
                    self.wrap_pending = true;
                    self.last_page = None;
                }
                self.ram_word(core);
            }
            _ => {
                if cont {
                    if self.cur_block.is_none() {
                        self.go_opaque(core, DesyncReason::BadBlockName);
                        return;
                    }
                    self.ram_body(core);
                } else {
                    self.need(core, 1, Hdr::RamIdLen);
                }
            }
        }
    }

    /// Fast path for the bulk of a RAM payload: CONTINUE ZERO and PAGE records whose
    /// header lies whole in `d`, parsed in place. Stops (returning the bytes consumed) at
    /// anything else, which the general path handles. PAGE needs a validated page size.
    fn fast_ram(&mut self, core: &mut Core, d: &[u8]) -> usize {
        const ZERO: u64 = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE;
        const PAGE: u64 = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE;
        let Some(block) = self.cur_block else {
            return 0;
        };
        let mask = u64::from(self.page_size) - 1;
        let page = u64::from(self.page_size);
        // Nothing inside a run of RAM records changes the section, the phase or the mode:
        // decide once whether pages count towards passes, and tally in locals.
        let tracking = core.phase == Phase::Precopy
            && self.sec.map(|s| s.ty) == Some(SecType::Part)
            && self.mode != Mode::Preempt;
        let base = self.pos;
        let (mut zeros, mut pages, mut ram_bytes) = (0u64, 0u64, 0u64);
        let mut i = 0;
        let mut partial = false;
        while d.len() - i >= 9 {
            let w = be64(&d[i..i + 8]);
            let flags = w & mask;
            let is_zero = flags == ZERO && d[i + 8] == 0;
            let is_page = flags == PAGE && self.page_confirmed;
            if !is_zero && !is_page {
                break;
            }
            let offset = w & !mask;
            if tracking {
                let here = (block, offset);
                if self.wrap_pending || self.last_page.is_some_and(|last| here < last) {
                    self.wrap_pending = false;
                    core.stats.passes += 1;
                    let pass = core.stats.passes;
                    core.push(base + i as u64, EventKind::PassStarted { pass });
                }
                self.last_page = Some(here);
            }
            self.rec_offset = offset;
            if is_zero {
                zeros += 1;
                ram_bytes += 9;
                i += 9;
            } else if (d.len() - i) as u64 >= 8 + page {
                pages += 1;
                ram_bytes += 8 + page;
                i += 8 + page as usize;
            } else {
                // The body continues in later input: skip it by count.
                self.rec_start = base + i as u64;
                self.rec_flags = RAM_SAVE_FLAG_PAGE;
                i += 8;
                partial = true;
                break;
            }
        }
        core.stats.ram.zero_pages += zeros;
        core.stats.ram.normal_pages += pages;
        self.count_ram(core, ram_bytes);
        self.pos = base + i as u64;
        if partial {
            self.page_body = self.pos;
            self.io.skip(page, SkipNext::PageEnd);
        } else {
            // The general path takes over at the next record: its header starts here.
            self.rec_start = self.pos;
            self.unit = self.pos;
        }
        i
    }

    /// Pass tracking (doc §3.3): in precopy PART sections, a page position below the
    /// previous one, or the first page after a MULTIFD_FLUSH, starts a new pass.
    fn track_pass(&mut self, core: &mut Core, block: u16) {
        if core.phase == Phase::Precopy
            && self.sec.map(|s| s.ty) == Some(SecType::Part)
            && self.mode != Mode::Preempt
        {
            let here = (block, self.rec_offset);
            let wrapped = self.wrap_pending || self.last_page.is_some_and(|last| here < last);
            if wrapped {
                self.wrap_pending = false;
                core.stats.passes += 1;
                let pass = core.stats.passes;
                core.push(self.rec_start, EventKind::PassStarted { pass });
            }
            self.last_page = Some(here);
        }
    }

    /// The page-carrying record's header is complete (block known): track the pass, then
    /// read its body.
    fn ram_body(&mut self, core: &mut Core) {
        let block = self.cur_block.unwrap_or(UNLISTED_BLOCK);
        self.track_pass(core, block);
        match self.rec_flags {
            RAM_SAVE_FLAG_ZERO => self.need(core, 1, Hdr::ZeroByte),
            RAM_SAVE_FLAG_PAGE => {
                self.page_body = self.pos;
                self.io.skip(u64::from(self.page_size), SkipNext::PageEnd);
            }
            RAM_SAVE_FLAG_XBZRLE => self.need(core, 3, Hdr::XbzHead),
            _ => self.need(core, 4, Hdr::CompLen),
        }
    }

    fn after_skip(&mut self, core: &mut Core, next: SkipNext) {
        match next {
            SkipNext::PageEnd => {
                core.stats.ram.normal_pages += 1;
                self.count_ram(core, self.pos - self.rec_start);
                if !self.page_confirmed {
                    self.page_check = true;
                }
                self.ram_word(core);
            }
            SkipNext::XbzEnd => {
                core.stats.ram.xbzrle_pages += 1;
                self.count_ram(core, self.pos - self.rec_start);
                self.ram_word(core);
            }
            SkipNext::CompEnd => {
                core.stats.ram.compressed_pages += 1;
                self.count_ram(core, self.pos - self.rec_start);
                self.ram_word(core);
            }
            SkipNext::PageRetry => {
                self.page_check = true;
                self.ram_word(core);
            }
            SkipNext::VmdescEnd => {
                self.ended = true;
                self.top(core);
            }
        }
    }

    /// Adds RAM record bytes to QEMU's counter for the current phase (doc §5 mapping).
    fn count_ram(&mut self, core: &mut Core, n: u64) {
        let ram = &mut core.stats.ram;
        if self.mode == Mode::Preempt {
            ram.postcopy_bytes += n;
            return;
        }
        match self.sec.map(|s| s.ty) {
            Some(SecType::Part | SecType::End) => {}
            _ => return,
        }
        match core.phase {
            Phase::Precopy => ram.precopy_bytes += n,
            Phase::Downtime => ram.downtime_bytes += n,
            Phase::Postcopy => ram.postcopy_bytes += n,
            Phase::Setup | Phase::ReturnPath => {}
        }
    }

    /// Validates the footer candidate in `buf` for section `id`.
    fn check_candidate(&mut self, core: &mut Core, id: u32) {
        match self.candidate(id) {
            Cand::More(n) => self.io.gather_more(n, Hdr::Cand(id)),
            Cand::Accept => {
                // The footer (5 bytes) closes the section; the rest is the next record.
                self.hold = None;
                self.schedule_replay(core, 5);
                self.top(core);
            }
            Cand::Reject => {
                self.hold = None;
                self.schedule_replay(core, 1);
                self.io.find(QEMU_VM_SECTION_FOOTER, Hdr::FooterMark(id));
            }
        }
    }

    fn candidate(&self, id: u32) -> Cand {
        let b = self.io.header();
        if b.len() < 5 {
            return Cand::More(5);
        }
        if be32(&b[1..5]) != id {
            return Cand::Reject;
        }
        if b.len() < 6 {
            return Cand::More(6);
        }
        match b[5] {
            // After a device section, EOF ends the precopy stream: VMDESCRIPTION or the
            // end of the connection follows (the latter is settled in `finish`).
            QEMU_VM_EOF => {
                if b.len() < 7 {
                    return Cand::More(7);
                }
                if b[6] != QEMU_VM_VMDESCRIPTION {
                    return Cand::Reject;
                }
                if b.len() < 11 {
                    return Cand::More(11);
                }
                if be32(&b[7..11]) < 1 << 30 {
                    Cand::Accept
                } else {
                    Cand::Reject
                }
            }
            QEMU_VM_COMMAND => {
                if b.len() < 10 {
                    return Cand::More(10);
                }
                let cmd = be16(&b[6..8]);
                let len = be16(&b[8..10]);
                let ok = match cmd {
                    MIG_CMD_OPEN_RETURN_PATH
                    | MIG_CMD_POSTCOPY_LISTEN
                    | MIG_CMD_POSTCOPY_RUN
                    | MIG_CMD_ENABLE_COLO
                    | MIG_CMD_POSTCOPY_RESUME
                    | MIG_CMD_SWITCHOVER_START => len == 0,
                    MIG_CMD_PING | MIG_CMD_PACKAGED => len == 4,
                    MIG_CMD_POSTCOPY_ADVISE => len == 0 || len == ADVISE_RAM_LEN,
                    MIG_CMD_POSTCOPY_RAM_DISCARD => (3..=MIG_RP_MAX_LEN).contains(&len),
                    MIG_CMD_RECV_BITMAP => (2..=256).contains(&len),
                    _ => false,
                };
                if ok { Cand::Accept } else { Cand::Reject }
            }
            QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
                if b.len() < 10 {
                    return Cand::More(10);
                }
                if self.known_section(be32(&b[6..10])).is_some() {
                    Cand::Accept
                } else {
                    Cand::Reject
                }
            }
            QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => {
                if b.len() < 11 {
                    return Cand::More(11);
                }
                let len = usize::from(b[10]);
                if len == 0 {
                    return Cand::Reject;
                }
                let total = 11 + len + 8;
                if b.len() < total {
                    return Cand::More(total);
                }
                let name_ok = b[11..11 + len].iter().all(|&c| (0x20..0x7f).contains(&c));
                let instance = be32(&b[11 + len..15 + len]);
                let version = be32(&b[15 + len..19 + len]);
                if name_ok && instance < 1 << 20 && version < 1 << 16 {
                    Cand::Accept
                } else {
                    Cand::Reject
                }
            }
            _ => Cand::Reject,
        }
    }
}
