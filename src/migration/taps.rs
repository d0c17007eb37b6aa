//! The taps a parsed route puts on each connection: the forward tap parses the source →
//! destination stream and books its bytes per phase; the reverse tap books the return
//! direction and parses the return path on the main channel.

use std::sync::Arc;
use std::time::Instant;

use super::{ChannelSummary, Migration, State};
use crate::link::Direction;
use crate::metrics::{ConnMeter, RouteMetrics};
use crate::qemu::{ChannelKind, EventKind, Phase, PhaseBytes, ReturnPathParser, StreamParser};
use crate::tap::Tap;

/// Parses and accounts the source → destination bytes of one connection.
#[derive(Debug)]
pub struct ForwardTap {
    mig: Arc<Migration>,
    main: bool,
    parser: StreamParser,
    last: PhaseBytes,
    /// The main channel's page size was passed on (non-main channels).
    hinted: bool,
    /// The connection's place in the connection metrics, until its kind is known.
    meter: Option<Arc<ConnMeter>>,
}

impl ForwardTap {
    /// A tap for a connection of `mig`; `main` if it opened the migration.
    pub fn new(mig: Arc<Migration>, main: bool) -> Self {
        ForwardTap {
            mig,
            main,
            parser: StreamParser::new(),
            last: PhaseBytes::default(),
            hinted: false,
            meter: None,
        }
    }

    /// Reports the channel kind to `meter` once the first bytes tell it.
    pub fn with_meter(mut self, meter: Arc<ConnMeter>) -> Self {
        self.meter = Some(meter);
        self
    }

    fn account(&mut self, n: u64, now: Instant) {
        let ForwardTap {
            mig,
            main,
            parser,
            last,
            ..
        } = self;
        let stats = parser.stats();
        let phases = stats.phases;
        let metrics = &mig.route.metrics;
        let sent = Direction::ToDestination;
        let mut st = mig.lock();
        for p in Phase::MIGRATION {
            let d = phases.get(p).saturating_sub(last.get(p));
            st.bytes[sent.index()][p.index()] += d;
            metrics.bytes(sent, p, d);
        }
        *last = phases;
        if *main {
            st.live_ram = stats.ram;
            st.ram_total = stats.ram_total_bytes;
        }
        mig.add_series(&mut st, sent, n, now);
        while let Some(ev) = parser.poll_event() {
            match ev.kind {
                EventKind::PhaseChanged { to, .. } if *main => mig.enter_phase(&mut st, to, ev.at),
                // A multifd channel's first pages start pre-copy if the main channel's first
                // RAM section has not yet (QEMU counts them as pre-copy).
                EventKind::PhaseChanged {
                    from: Phase::Setup,
                    to: Phase::Precopy,
                } if !*main && mig.phase() == Phase::Setup => {
                    mig.enter_phase(&mut st, Phase::Precopy, ev.at)
                }
                EventKind::PassStarted { pass } if *main => {
                    metrics.passes(u64::from(pass.saturating_sub(st.passes)));
                    st.passes = st.passes.max(pass);
                }
                EventKind::PageSize(p) if *main => st.page_size = Some(p),
                EventKind::MultifdPacket(p) => st.ledger.record(&p),
                _ => {}
            }
        }
        if let Some(kind) = parser.channel() {
            if let Some(meter) = self.meter.take() {
                meter.set_channel(kind);
            }
        }
        // Other channels learn the page size from the main channel, once it is known.
        if !*main && !self.hinted {
            if let Some(p) = st.page_size {
                parser.set_page_size_hint(p);
                self.hinted = true;
            }
        }
    }

    /// Settles the parser at the end of the stream and reports the channel.
    fn finish(mut self, now: Instant) -> ChannelSummary {
        self.parser.finish(now);
        self.account(0, now);
        ChannelSummary {
            kind: self
                .parser
                .channel()
                .unwrap_or(ChannelKind::Unknown)
                .as_str(),
            main: self.main,
            stats: *self.parser.stats(),
            outcome: self.parser.outcome(),
        }
    }
}

impl Tap for ForwardTap {
    fn on_chunk(&mut self, chunk: &[u8]) {
        let now = Instant::now();
        if !self.main {
            self.parser.follow_phase(self.mig.phase(), now);
        }
        self.parser.feed(chunk, now);
        self.account(chunk.len() as u64, now);
    }

    fn wants_bytes(&self) -> bool {
        !self.parser.is_opaque()
    }

    fn on_unseen(&mut self, n: usize) {
        let now = Instant::now();
        if !self.main {
            self.parser.follow_phase(self.mig.phase(), now);
        }
        self.parser.feed_opaque(n, now);
        self.account(n as u64, now);
    }
}

/// Accounts the destination → source bytes of one connection; parses the return path on
/// the main channel.
#[derive(Debug)]
pub struct ReverseTap {
    mig: Arc<Migration>,
    rp: Option<ReturnPathParser>,
}

impl ReverseTap {
    /// A tap for a connection of `mig`; parses the return path if `main`.
    pub fn new(mig: Arc<Migration>, main: bool) -> Self {
        ReverseTap {
            mig,
            rp: main.then(ReturnPathParser::new),
        }
    }

    fn finish(mut self, now: Instant) {
        if let Some(rp) = &mut self.rp {
            rp.finish(now);
            drain_rp(rp, &mut self.mig.lock(), &self.mig.route.metrics);
        }
    }
}

impl Tap for ReverseTap {
    fn on_chunk(&mut self, chunk: &[u8]) {
        let now = Instant::now();
        if let Some(rp) = &mut self.rp {
            rp.feed(chunk, now);
        }
        self.account(chunk.len(), now);
    }

    fn wants_bytes(&self) -> bool {
        self.rp.is_some()
    }

    fn on_unseen(&mut self, n: usize) {
        self.account(n, Instant::now());
    }
}

impl ReverseTap {
    fn account(&mut self, n: usize, now: Instant) {
        let mig = &self.mig;
        let metrics = &mig.route.metrics;
        let phase = mig.phase();
        let back = Direction::ToSource;
        metrics.bytes(back, phase, n as u64);
        let mut st = mig.lock();
        st.bytes[back.index()][phase.index()] += n as u64;
        mig.add_series(&mut st, back, n as u64, now);
        if let Some(rp) = &mut self.rp {
            drain_rp(rp, &mut st, metrics);
        }
    }
}

/// Takes the return path's events into the migration.
fn drain_rp(rp: &mut ReturnPathParser, st: &mut State, metrics: &RouteMetrics) {
    while let Some(ev) = rp.poll_event() {
        match ev.kind {
            EventKind::PageRequest { .. } => {
                st.page_requests += 1;
                metrics.page_request();
            }
            EventKind::Shut(code) => st.shut = Some(code),
            _ => {}
        }
    }
}

/// Ends a connection's part in its migration: settles both taps, notes a failure.
pub fn connection_ended(fwd: ForwardTap, rev: ReverseTap, failure: Option<String>) {
    let now = Instant::now();
    let mig = fwd.mig.clone();
    if let Some(f) = failure {
        mig.fail(f);
    }
    rev.finish(now);
    let summary = fwd.finish(now);
    mig.connection_closed(Some(summary), now);
}
