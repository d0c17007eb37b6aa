//! How the parser learns the target page size P (docs/qemu-stream.md §3.2): from the
//! configuration's target page bits, POSTCOPY_ADVISE, the machine type or the owner's hint,
//! else the default; a size not announced by the stream is checked on the RAM word after
//! each PAGE record and raised to the next candidate when that word does not parse.

use super::super::wire::*;
use super::super::{Core, DesyncReason};
use super::ram::{RamBody, ram_flags};
use super::{MainParser, SkipNext};

/// Where the page size came from; a better source overrides a weaker one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum PageSource {
    Default,
    Hint,
    Machine,
    Advise,
    Config,
}

impl PageSource {
    /// The page size to start from, and its source.
    pub(super) fn initial(page_hint: Option<u32>) -> (u32, PageSource) {
        match page_hint {
            Some(p) => (p, PageSource::Hint),
            None => (DEFAULT_PAGE_SIZE, PageSource::Default),
        }
    }
}

/// Page size implied by a machine type (docs/qemu-stream.md §3.2 step 3).
pub(super) fn machine_page_size(name: &[u8]) -> u32 {
    let starts = |p: &[u8]| name.starts_with(p);
    if starts(b"clipper") || starts(b"sun4u") || starts(b"sun4v") || starts(b"niagara") {
        8192
    } else {
        DEFAULT_PAGE_SIZE
    }
}

impl MainParser {
    /// Takes page size `p` from `src` unless a better source gave one already.
    pub(super) fn set_page(&mut self, core: &mut Core, p: u32, src: PageSource) {
        if src >= self.page_src
            && p.is_power_of_two()
            && (MIN_PAGE_SIZE..=MAX_PAGE_SIZE).contains(&p)
        {
            self.page_size = p;
            self.page_src = src;
            core.set_page_size(self.unit, p);
        }
    }

    /// Checks the page size on `w`, the RAM word right after a PAGE or XBZRLE record
    /// (docs/qemu-stream.md §3.2 step 4). Returns whether `w` may be parsed as a RAM word;
    /// otherwise the parser moved on (re-reading after a larger page, or opaque).
    pub(super) fn check_page_size(&mut self, core: &mut Core, w: u64) -> bool {
        if ram_flags(w, self.page_size).is_none() && !self.page_confirmed {
            // The page was longer than assumed: try the next candidate size.
            let next = PAGE_SIZE_CANDIDATES
                .iter()
                .copied()
                .find(|&p| p > self.page_size);
            let Some(p) = next else {
                self.go_opaque(core, DesyncReason::PageSizeUnresolved);
                return false;
            };
            let extra = u64::from(p - self.page_size);
            // The word we read sits `page_size` after the body start; the real one sits
            // `p` after it.
            let skip = (self.page_body + u64::from(p)).saturating_sub(self.pos);
            self.count_ram(core, extra);
            self.page_size = p;
            self.page_src = PageSource::Default;
            self.io.skip(skip, SkipNext::Ram(RamBody::PageRetry));
            return false;
        }
        self.page_check = false;
        if !self.page_confirmed {
            self.page_confirmed = true;
            core.set_page_size(self.rec_start, self.page_size);
        }
        true
    }
}
