//! Harness shared by the stream targets (`main_stream`, `multifd`, `return_path`).
//!
//! The input is the stream itself (so real captures are valid seeds). Everything else is
//! derived from the input: an FNV-1a hash of it seeds a small PRNG that chooses the split
//! points and a plan of owner calls at chosen offsets (`set_page_size_hint`,
//! `follow_phase`). Each input is parsed three times, fed whole, in the pseudo-random
//! splits and byte by byte, with the same plan, and checked against the parser contract
//! (`src/qemu/mod.rs`):
//! * no panic (any input);
//! * after every `feed`: `total_bytes` = bytes fed, `phases.sum() + unattributed_bytes =
//!   total_bytes`, `unattributed_bytes <= MAX_HEADER_BYTES`, `opaque_bytes <= total_bytes`,
//!   every event offset `<= total_bytes`;
//! * after `finish`: every byte attributed (`phases.sum() == total_bytes`, no unattributed
//!   bytes), an outcome other than `Running`;
//! * the three feedings give identical stats, outcome and events ("whole, random splits or
//!   byte by byte give identical counters and events"); inputs over 4 KiB are fed in
//!   random 1..=16-byte chunks instead of byte by byte.

#![allow(dead_code)]

use std::time::Instant;

use migshaper::qemu::{
    Event, MAX_HEADER_BYTES, Outcome, Phase, ReturnPathParser, Stats, StreamParser,
};

/// An owner call made before the byte at `offset` is fed.
#[derive(Debug, Clone, Copy)]
pub enum Action {
    Hint(u32),
    Follow(Phase),
}

/// What one input is run with.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Sorted by offset.
    pub actions: Vec<(usize, Action)>,
    /// Split points of the "random splits" feeding, sorted, in `1..len`.
    pub cuts: Vec<usize>,
}

/// xorshift64*, seeded from the input.
pub struct Rng(u64);

impl Rng {
    pub fn new(data: &[u8]) -> Self {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        h ^= data.len() as u64;
        Rng(h | 1)
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform-ish in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Split points: chunk sizes mixing tiny (header-splitting) and large ones.
pub fn random_cuts(rng: &mut Rng, len: usize) -> Vec<usize> {
    let mut cuts = Vec::new();
    let mut at = 0usize;
    loop {
        let max = match rng.below(4) {
            0 => 8,
            1 => 64,
            2 => 600,
            _ => 8192,
        };
        at += 1 + rng.below(max);
        if at >= len {
            return cuts;
        }
        cuts.push(at);
    }
}

/// Up to `n` actions at random offsets in `0..=len`, drawn by `pick`.
pub fn random_actions(
    rng: &mut Rng,
    len: usize,
    n: usize,
    mut pick: impl FnMut(&mut Rng) -> Action,
) -> Vec<(usize, Action)> {
    let count = rng.below(n + 1);
    let mut v: Vec<(usize, Action)> = (0..count)
        .map(|_| {
            let at = rng.below(len + 1);
            (at, pick(rng))
        })
        .collect();
    v.sort_by_key(|&(at, _)| at);
    v
}

/// A page size hint: mostly valid sizes, sometimes invalid ones (must be ignored).
pub fn random_hint(rng: &mut Rng) -> u32 {
    const HINTS: [u32; 8] = [4096, 4096, 4096, 8192, 16384, 65536, 2048, 0];
    HINTS[rng.below(HINTS.len())]
}

pub fn random_phase(rng: &mut Rng) -> Phase {
    Phase::ALL[rng.below(Phase::ALL.len())]
}

/// The parser surface the harness drives.
pub trait Target {
    fn fresh() -> Self;
    fn feed(&mut self, b: &[u8], now: Instant);
    fn finish(&mut self, now: Instant);
    fn act(&mut self, a: Action, now: Instant);
    fn stats(&self) -> Stats;
    fn poll(&mut self) -> Option<Event>;
    fn outcome(&self) -> Outcome;
    /// Phase invariants specific to the parser, checked after `finish`.
    fn check_final(&self) {}
}

impl Target for StreamParser {
    fn fresh() -> Self {
        StreamParser::new()
    }
    fn feed(&mut self, b: &[u8], now: Instant) {
        StreamParser::feed(self, b, now)
    }
    fn finish(&mut self, now: Instant) {
        StreamParser::finish(self, now)
    }
    fn act(&mut self, a: Action, now: Instant) {
        match a {
            Action::Hint(p) => self.set_page_size_hint(p),
            Action::Follow(phase) => self.follow_phase(phase, now),
        }
    }
    fn stats(&self) -> Stats {
        *StreamParser::stats(self)
    }
    fn poll(&mut self) -> Option<Event> {
        self.poll_event()
    }
    fn outcome(&self) -> Outcome {
        StreamParser::outcome(self)
    }
    fn check_final(&self) {
        let s = StreamParser::stats(self);
        assert_eq!(
            s.phases.return_path, 0,
            "source→destination bytes in the return-path phase: {s:?}"
        );
        if s.total_bytes > 0 {
            assert!(self.channel().is_some(), "no channel kind after finish");
        }
    }
}

impl Target for ReturnPathParser {
    fn fresh() -> Self {
        ReturnPathParser::new()
    }
    fn feed(&mut self, b: &[u8], now: Instant) {
        ReturnPathParser::feed(self, b, now)
    }
    fn finish(&mut self, now: Instant) {
        ReturnPathParser::finish(self, now)
    }
    fn act(&mut self, _: Action, _: Instant) {}
    fn stats(&self) -> Stats {
        *ReturnPathParser::stats(self)
    }
    fn poll(&mut self) -> Option<Event> {
        self.poll_event()
    }
    fn outcome(&self) -> Outcome {
        ReturnPathParser::outcome(self)
    }
    fn check_final(&self) {
        let s = ReturnPathParser::stats(self);
        assert_eq!(
            s.phases.return_path, s.total_bytes,
            "return-path bytes outside the return-path phase: {s:?}"
        );
        assert_eq!(self.phase(), Phase::ReturnPath);
    }
}

/// What one feeding produced.
#[derive(Debug, PartialEq)]
pub struct Run {
    pub stats: Stats,
    pub outcome: Outcome,
    pub events: Vec<Event>,
}

fn drain<T: Target>(p: &mut T, events: &mut Vec<Event>) {
    while let Some(e) = p.poll() {
        events.push(e);
    }
}

fn check_running(s: &Stats, fed: usize, events: &[Event]) {
    assert_eq!(s.total_bytes, fed as u64, "total_bytes != bytes fed: {s:?}");
    assert_eq!(
        s.phases.sum() + s.unattributed_bytes,
        s.total_bytes,
        "phases + unattributed != total: {s:?}"
    );
    assert!(
        s.unattributed_bytes <= MAX_HEADER_BYTES as u64,
        "more than MAX_HEADER_BYTES unattributed: {s:?}"
    );
    assert!(s.opaque_bytes <= s.total_bytes, "opaque > total: {s:?}");
    for e in events {
        assert!(
            e.offset <= s.total_bytes,
            "event beyond the bytes fed ({}): {e:?}",
            s.total_bytes
        );
    }
}

/// Feeds `data` split at `cuts` (sorted, any values), applying `plan.actions` before the
/// byte at their offset, then finishes; checks the invariants on the way.
pub fn run<T: Target>(data: &[u8], plan: &Plan, cuts: &[usize], now: Instant) -> Run {
    let mut p = T::fresh();
    let mut events = Vec::new();
    let mut bounds: Vec<usize> = cuts
        .iter()
        .copied()
        .chain(plan.actions.iter().map(|&(at, _)| at))
        .filter(|&at| at > 0 && at < data.len())
        .collect();
    bounds.sort_unstable();
    bounds.dedup();
    bounds.push(data.len());
    let mut actions = plan.actions.iter().peekable();
    let mut pos = 0usize;
    for end in bounds {
        while let Some(&&(at, a)) = actions.peek() {
            if at > pos {
                break;
            }
            p.act(a, now);
            actions.next();
        }
        if end > pos {
            let before = events.len();
            p.feed(&data[pos..end], now);
            drain(&mut p, &mut events);
            pos = end;
            check_running(&p.stats(), pos, &events[before..]);
        }
    }
    for &(_, a) in actions {
        p.act(a, now);
    }
    drain(&mut p, &mut events);
    p.finish(now);
    drain(&mut p, &mut events);
    let stats = p.stats();
    check_running(&stats, data.len(), &events);
    assert_eq!(
        stats.unattributed_bytes, 0,
        "unattributed after finish: {stats:?}"
    );
    assert_eq!(
        stats.phases.sum(),
        stats.total_bytes,
        "phases != total: {stats:?}"
    );
    let outcome = p.outcome();
    assert_ne!(outcome, Outcome::Running, "Running after finish");
    if data.is_empty() {
        assert_eq!(outcome, Outcome::Empty);
    }
    p.check_final();
    Run {
        stats,
        outcome,
        events,
    }
}

/// Largest input also fed byte by byte; longer ones are fed in random 1..=16-byte chunks
/// instead (byte by byte costs ~20 ms per 16 KiB input under the sanitizers).
const BYTEWISE_MAX: usize = 4096;

/// Runs `data` whole, in random splits and byte by byte (or in tiny chunks); all three must
/// agree.
pub fn check<T: Target>(data: &[u8], plan: &Plan) {
    let now = Instant::now();
    let whole = run::<T>(data, plan, &[], now);
    let split = run::<T>(data, plan, &plan.cuts, now);
    compare("whole", &whole, "random splits", &split);
    if data.len() <= BYTEWISE_MAX {
        let every: Vec<usize> = (1..data.len()).collect();
        let bytewise = run::<T>(data, plan, &every, now);
        compare("whole", &whole, "byte by byte", &bytewise);
    } else {
        let mut rng = Rng::new(&plan.cuts.len().to_le_bytes());
        let mut fine = Vec::with_capacity(data.len() / 8);
        let mut at = 0;
        loop {
            at += 1 + rng.below(16);
            if at >= data.len() {
                break;
            }
            fine.push(at);
        }
        let tiny = run::<T>(data, plan, &fine, now);
        compare("whole", &whole, "1..=16-byte chunks", &tiny);
    }
}

fn compare(an: &str, a: &Run, bn: &str, b: &Run) {
    if a.stats.dropped_events == 0 && b.stats.dropped_events == 0 {
        assert_eq!(a, b, "fed {an} vs fed {bn}");
    } else {
        // More than MAX_QUEUED_EVENTS in one feed: the queues legitimately differ.
        let strip = |s: &Stats| Stats {
            dropped_events: 0,
            ..*s
        };
        assert_eq!(strip(&a.stats), strip(&b.stats), "fed {an} vs fed {bn}");
        assert_eq!(a.outcome, b.outcome, "fed {an} vs fed {bn}");
    }
}
