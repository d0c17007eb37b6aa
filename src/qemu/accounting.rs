//! The accounting every parser shares: byte tallies per phase, the current phase, the
//! event queue and what the outcome is settled from.

use std::collections::VecDeque;
use std::time::Instant;

use super::{DesyncReason, Event, EventKind, MAX_QUEUED_EVENTS, Phase, Stats};

/// Shared accounting: tallies, phase, the event queue and the outcome bookkeeping.
#[derive(Debug)]
pub(super) struct Core {
    pub(super) stats: Stats,
    pub(super) phase: Phase,
    /// Stream offset up to which bytes are attributed to a phase.
    tallied: u64,
    pub(super) events: VecDeque<Event>,
    /// The `now` of the call in progress.
    pub(super) now: Option<Instant>,
    pub(super) desync: Option<DesyncReason>,
    pub(super) finished: bool,
}

impl Core {
    pub(super) fn new(phase: Phase) -> Self {
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
    pub(super) fn attribute(&mut self, upto: u64) {
        if upto > self.tallied {
            self.stats.phases.add(self.phase, upto - self.tallied);
            self.tallied = upto;
        }
        self.stats.unattributed_bytes = self.stats.total_bytes - self.tallied;
    }

    /// Switches phase at stream offset `at`: earlier bytes stay with the old phase.
    pub(super) fn set_phase(&mut self, phase: Phase, at: u64) {
        if phase == self.phase {
            return;
        }
        self.attribute(at);
        let from = self.phase;
        self.phase = phase;
        self.push(at, EventKind::PhaseChanged { from, to: phase });
    }

    pub(super) fn push(&mut self, offset: u64, kind: EventKind) {
        let Some(at) = self.now else {
            return;
        };
        if self.events.len() >= MAX_QUEUED_EVENTS {
            self.events.pop_front();
            self.stats.dropped_events += 1;
        }
        self.events.push_back(Event { at, offset, kind });
    }

    pub(super) fn desync(&mut self, offset: u64, reason: DesyncReason) {
        if self.desync.is_none() {
            self.desync = Some(reason);
            self.push(offset, EventKind::Desync(reason));
        }
    }

    pub(super) fn set_page_size(&mut self, offset: u64, p: u32) {
        if self.stats.page_size != Some(p) {
            self.stats.page_size = Some(p);
            self.push(offset, EventKind::PageSize(p));
        }
    }
}
