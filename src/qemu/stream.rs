//! [`StreamParser`]: recognises a source→destination connection's channel from its first
//! bytes (docs/qemu-stream.md §8) and hands the stream to the parser for that channel.

use std::time::Instant;

use super::accounting::Core;
use super::main_stream::{MainParser, Mode};
use super::multifd::MultifdParser;
use super::{ChannelKind, DesyncReason, Event, EventKind, Outcome, Phase, Stats, wire};

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
