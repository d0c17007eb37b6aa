//! Pre-copy pass tracking (docs/qemu-stream.md §3.3): QEMU scans guest RAM in block order,
//! then page order, once per pass. In precopy PART sections of the main channel, a page
//! position below the previous one, or the first page after a MULTIFD_FLUSH, starts a new
//! pass (the first PART starts pass 1, see [`super::records`]).

use super::super::{Core, EventKind, Phase};
use super::MainParser;
use super::records::SecType;

/// The scan position, to see it wrap.
#[derive(Debug, Default)]
pub(super) struct Passes {
    /// (block index, page offset) of the last page seen.
    last_page: Option<(u16, u64)>,
    /// A MULTIFD_FLUSH was seen: the next page starts a pass.
    wrap_pending: bool,
}

impl Passes {
    /// A MULTIFD_FLUSH in a precopy PART section: the next page starts a pass.
    pub(super) fn flush(&mut self) {
        self.wrap_pending = true;
        self.last_page = None;
    }

    /// A page at `here` (block index, offset), in a record at stream offset `at`.
    #[inline]
    pub(super) fn page(&mut self, core: &mut Core, here: (u16, u64), at: u64) {
        if self.wrap_pending || self.last_page.is_some_and(|last| here < last) {
            self.wrap_pending = false;
            core.stats.passes += 1;
            let pass = core.stats.passes;
            core.push(at, EventKind::PassStarted { pass });
        }
        self.last_page = Some(here);
    }
}

impl MainParser {
    /// Whether pages count towards passes here: precopy PART sections, not on the preempt
    /// channel.
    pub(super) fn tracks_passes(&self, core: &Core) -> bool {
        core.phase == Phase::Precopy
            && self.sec_type() == Some(SecType::Part)
            && self.mode != super::Mode::Preempt
    }

    /// The current record's page (in `block`, at `rec_offset`) may start a pass.
    pub(super) fn track_pass(&mut self, core: &mut Core, block: u16) {
        if self.tracks_passes(core) {
            self.passes
                .page(core, (block, self.rec_offset), self.rec_start);
        }
    }
}
