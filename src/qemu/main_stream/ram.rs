//! The `ram` section payload (docs/qemu-stream.md §3): RAM records, each a be64 word of
//! page offset and flags, an idstr unless CONTINUE, and a body (ZERO: 1 byte, PAGE: P bytes,
//! XBZRLE and COMPRESS: counted); RAM byte counting per phase (docs/qemu-stream.md §5); and
//! the in-place fast path for runs of ZERO and PAGE records.

use super::super::bytes::{be16, be32, be64, name_hash};
use super::super::wire::*;
use super::super::{Core, DesyncReason, Phase};
use super::mem_size::{MemHdr, UNLISTED_BLOCK};
use super::records::{RecordHdr, SecType};
use super::{MainParser, Mode, SkipNext};

/// Headers of a RAM record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RamHdr {
    /// The be64 offset-and-flags word.
    Word,
    IdLen,
    /// The RAMBlock name.
    Id,
    /// The fill byte of a ZERO record.
    ZeroByte,
    /// XBZRLE: encoding byte + be16 length.
    XbzHead,
    /// COMPRESS_PAGE: be32 length.
    CompLen,
}

/// RAM record bodies skipped by count.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RamBody {
    Page,
    Xbz,
    Comp,
    /// Extra bytes of a page after a page-size correction: then re-read the word.
    PageRetry,
}

/// Splits a RAM word into (main flag, CONTINUE) if its flag bits are a valid combination
/// for page size `p`.
pub(super) fn ram_flags(w: u64, p: u32) -> Option<(u64, bool)> {
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

impl MainParser {
    /// Expects the next RAM record's word.
    pub(super) fn ram_word(&mut self, core: &mut Core) {
        self.need(core, 8, RamHdr::Word);
    }

    pub(super) fn on_ram(&mut self, core: &mut Core, h: RamHdr) {
        let b = self.io.header();
        match h {
            RamHdr::Word => {
                let w = be64(b);
                self.rec_start = self.pos - 8;
                self.on_ram_word(core, w);
            }
            RamHdr::IdLen => {
                let len = usize::from(b[0]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::BadBlockName);
                } else {
                    self.need(core, len, RamHdr::Id);
                }
            }
            RamHdr::Id => {
                let h = name_hash(b);
                self.cur_block = Some(self.blocks.index(h));
                self.ram_body(core);
            }
            RamHdr::ZeroByte => {
                if b[0] != 0 {
                    self.go_opaque(core, DesyncReason::BadPageRecord);
                } else {
                    core.stats.ram.zero_pages += 1;
                    self.count_ram(core, self.pos - self.rec_start);
                    self.ram_word(core);
                }
            }
            RamHdr::XbzHead => {
                let len = be16(&b[1..3]);
                if b[0] != ENCODING_FLAG_XBZRLE || u32::from(len) > self.page_size {
                    self.go_opaque(core, DesyncReason::BadPageRecord);
                } else {
                    self.skip_body(core, u64::from(len), RamBody::Xbz);
                }
            }
            RamHdr::CompLen => {
                let len = be32(b);
                if u64::from(len) > 2 * u64::from(self.page_size) + 1024 {
                    self.go_opaque(core, DesyncReason::BadPageRecord);
                } else {
                    self.skip_body(core, u64::from(len), RamBody::Comp);
                }
            }
        }
    }

    /// Skips a record body of `n` bytes (at once when `n` is 0).
    fn skip_body(&mut self, core: &mut Core, n: u64, body: RamBody) {
        self.io.skip(n, SkipNext::Ram(body));
        if n == 0 {
            self.after_ram_body(core, body);
        }
    }

    /// A RAM record's word `w` (at `rec_start`) is complete.
    pub(super) fn on_ram_word(&mut self, core: &mut Core, w: u64) {
        if self.page_check && !self.check_page_size(core, w) {
            return;
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
                if self.sec_type() == Some(SecType::Part) {
                    self.count_ram(core, 8);
                }
                self.need(core, 1, RecordHdr::FooterPeek);
            }
            RAM_SAVE_FLAG_MEM_SIZE => {
                if self.sec_type() != Some(SecType::Start) || self.mem_total != 0 {
                    self.go_opaque(core, DesyncReason::BadMemSize);
                    return;
                }
                self.mem_total = w & !RAM_FLAGS_MASK;
                core.stats.ram_total_bytes = self.mem_total;
                self.mem_sum = 0;
                if self.mem_total == 0 {
                    self.ram_word(core);
                } else {
                    self.need(core, 1, MemHdr::IdLen);
                }
            }
            RAM_SAVE_FLAG_MULTIFD_FLUSH => {
                if self.sec_type() == Some(SecType::Part) && core.phase == Phase::Precopy {
                    self.passes.flush();
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
                    self.need(core, 1, RamHdr::IdLen);
                }
            }
        }
    }

    /// The page-carrying record's header is complete (block known): track the pass, then
    /// read its body.
    fn ram_body(&mut self, core: &mut Core) {
        let block = self.cur_block.unwrap_or(UNLISTED_BLOCK);
        self.track_pass(core, block);
        match self.rec_flags {
            RAM_SAVE_FLAG_ZERO => self.need(core, 1, RamHdr::ZeroByte),
            RAM_SAVE_FLAG_PAGE => {
                self.page_body = self.pos;
                self.io
                    .skip(u64::from(self.page_size), SkipNext::Ram(RamBody::Page));
            }
            RAM_SAVE_FLAG_XBZRLE => self.need(core, 3, RamHdr::XbzHead),
            _ => self.need(core, 4, RamHdr::CompLen),
        }
    }

    /// A record body was skipped: count the record, then read the next word.
    pub(super) fn after_ram_body(&mut self, core: &mut Core, body: RamBody) {
        match body {
            RamBody::Page => {
                core.stats.ram.normal_pages += 1;
                self.count_ram(core, self.pos - self.rec_start);
                if !self.page_confirmed {
                    self.page_check = true;
                }
            }
            RamBody::Xbz => {
                core.stats.ram.xbzrle_pages += 1;
                self.count_ram(core, self.pos - self.rec_start);
            }
            RamBody::Comp => {
                core.stats.ram.compressed_pages += 1;
                self.count_ram(core, self.pos - self.rec_start);
            }
            RamBody::PageRetry => self.page_check = true,
        }
        self.ram_word(core);
    }

    /// Adds RAM record bytes to QEMU's counter for the current phase (docs/qemu-stream.md §5,
    /// the mapping to `query-migrate`).
    pub(super) fn count_ram(&mut self, core: &mut Core, n: u64) {
        let ram = &mut core.stats.ram;
        if self.mode == Mode::Preempt {
            ram.postcopy_bytes += n;
            return;
        }
        match self.sec_type() {
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

    /// Fast path for the bulk of a RAM payload: CONTINUE ZERO and PAGE records whose
    /// header lies whole in `d`, parsed in place. Stops (returning the bytes consumed) at
    /// anything else, which the general path handles. PAGE needs a validated page size.
    pub(super) fn fast_ram(&mut self, core: &mut Core, d: &[u8]) -> usize {
        const ZERO: u64 = RAM_SAVE_FLAG_ZERO | RAM_SAVE_FLAG_CONTINUE;
        const PAGE: u64 = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE;
        let Some(block) = self.cur_block else {
            return 0;
        };
        let mask = u64::from(self.page_size) - 1;
        let page = u64::from(self.page_size);
        // Nothing inside a run of RAM records changes the section, the phase or the mode:
        // decide once whether pages count towards passes, and tally in locals.
        let tracking = self.tracks_passes(core);
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
                self.passes.page(core, (block, offset), base + i as u64);
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
            self.io.skip(page, SkipNext::Ram(RamBody::Page));
        } else {
            // The general path takes over at the next record: its header starts here.
            self.rec_start = self.pos;
            self.unit = self.pos;
        }
        i
    }
}
