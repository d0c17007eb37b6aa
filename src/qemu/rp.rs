//! The return path: destination→source messages on the main connection
//! (docs/qemu-stream.md §6).
//!
//! Each message is be16 type, be16 length (≤ 512), payload. RECV_BITMAP is followed, outside
//! that framing, by be64 size S, S bytes of bitmap (skipped by count) and a be64 end mark.
//! Every byte belongs to [`Phase::ReturnPath`].

use std::time::Instant;

use super::bytes::{be16, be32, be64};
use super::stepper::{Step, Stepper, Want};
use super::wire::*;
use super::{Core, DesyncReason, Event, EventKind, Outcome, Phase, Stats};

/// Largest RECV_BITMAP the parser accepts: one bit per page of 2^40 pages.
const MAX_BITMAP_BYTES: u64 = 1 << 37;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hdr {
    Msg,
    Body(u16),
    BitmapSize,
    BitmapEnd,
}

/// The one body skipped by count: a RECV_BITMAP bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bitmap;

/// Parser for the destination→source bytes of the main connection.
#[derive(Debug)]
pub struct ReturnPathParser {
    core: Core,
    io: Stepper<Hdr, Bitmap>,
    /// Stream offset of the next byte to consume.
    pos: u64,
    /// Stream offset where the message being read began.
    unit: u64,
    shut: Option<u32>,
}

impl Default for ReturnPathParser {
    fn default() -> Self {
        Self::new()
    }
}

impl ReturnPathParser {
    /// A parser for a new return path.
    pub fn new() -> Self {
        ReturnPathParser {
            core: Core::new(Phase::ReturnPath),
            io: Stepper::new(Want::Header(4, Hdr::Msg)),
            pos: 0,
            unit: 0,
            shut: None,
        }
    }

    /// Feeds the next destination→source bytes, in order.
    pub fn feed(&mut self, bytes: &[u8], now: Instant) {
        if bytes.is_empty() || self.core.finished {
            return;
        }
        self.core.now = Some(now);
        self.core.stats.total_bytes += bytes.len() as u64;
        let mut i = 0;
        while i < bytes.len() {
            let (used, step) = self.io.step(&bytes[i..]);
            i += used;
            self.pos += used as u64;
            match step {
                Step::Pending => {}
                Step::Opaque => self.core.stats.opaque_bytes += used as u64,
                Step::Header(h) => self.on_hdr(h),
                Step::Body(Bitmap) => self.need(8, Hdr::BitmapEnd),
            }
        }
        let total = self.core.stats.total_bytes;
        self.core.attribute(total);
    }

    fn need(&mut self, n: usize, h: Hdr) {
        self.unit = self.pos;
        self.io.gather(n, h);
        if n == 0 {
            self.on_hdr(h);
        }
    }

    fn go_opaque(&mut self, reason: DesyncReason) {
        self.core.stats.opaque_bytes += self.pos.saturating_sub(self.unit);
        self.core.desync(self.unit, reason);
        self.io.opaque();
    }

    fn on_hdr(&mut self, h: Hdr) {
        let b = self.io.header();
        match h {
            Hdr::Msg => {
                let kind = be16(b);
                let len = be16(&b[2..]);
                let ok = match kind {
                    MIG_RP_MSG_SHUT | MIG_RP_MSG_PONG | MIG_RP_MSG_RESUME_ACK => len == 4,
                    MIG_RP_MSG_REQ_PAGES => len == 12,
                    MIG_RP_MSG_REQ_PAGES_ID => (14..=13 + 255).contains(&len),
                    MIG_RP_MSG_RECV_BITMAP => (2..=256).contains(&len),
                    MIG_RP_MSG_SWITCHOVER_ACK => len == 0,
                    _ => false,
                };
                if self.shut.is_some() {
                    self.go_opaque(DesyncReason::AfterEnd);
                } else if !ok || len > MIG_RP_MAX_LEN {
                    self.go_opaque(DesyncReason::BadRpMessage { kind, len });
                } else {
                    let start = self.unit;
                    self.need(usize::from(len), Hdr::Body(kind));
                    self.unit = start;
                }
            }
            Hdr::Body(kind) => self.on_message(kind),
            Hdr::BitmapSize => {
                let size = be64(b);
                if size % 8 != 0 || size > MAX_BITMAP_BYTES {
                    self.go_opaque(DesyncReason::BadBitmapTrailer);
                } else if size == 0 {
                    self.need(8, Hdr::BitmapEnd);
                } else {
                    self.io.skip(size, Bitmap);
                }
            }
            Hdr::BitmapEnd => {
                let mark = be64(b);
                if mark != RAMBLOCK_RECV_BITMAP_ENDING {
                    self.go_opaque(DesyncReason::BadBitmapTrailer);
                } else {
                    self.need(4, Hdr::Msg);
                }
            }
        }
    }

    /// The payload of a message of type `kind` is complete.
    fn on_message(&mut self, kind: u16) {
        let b = self.io.header();
        let n = b.len();
        let at = self.unit;
        // SHUT and PONG carry a be32 (their length was checked to be 4).
        let v32 = || be32(b);
        match kind {
            MIG_RP_MSG_SHUT => {
                let code = v32();
                self.shut = Some(code);
                self.core.push(at, EventKind::Shut(code));
            }
            MIG_RP_MSG_PONG => self.core.push(at, EventKind::Pong(v32())),
            MIG_RP_MSG_REQ_PAGES | MIG_RP_MSG_REQ_PAGES_ID => {
                let len = be32(&b[8..]);
                if kind == MIG_RP_MSG_REQ_PAGES_ID && usize::from(b[12]) + 13 != n {
                    self.go_opaque(DesyncReason::BadRpMessage {
                        kind,
                        len: n as u16,
                    });
                    return;
                }
                self.core.stats.ram.page_requests += 1;
                self.core.push(at, EventKind::PageRequest { len });
            }
            MIG_RP_MSG_RECV_BITMAP => {
                self.need(8, Hdr::BitmapSize);
                return;
            }
            _ => {}
        }
        self.need(4, Hdr::Msg);
    }

    /// The return path closed: settles the [`Outcome`].
    pub fn finish(&mut self, now: Instant) {
        if self.core.finished {
            return;
        }
        self.core.now = Some(now);
        self.core.finished = true;
        self.core.stats.unattributed_bytes = 0;
    }

    /// Always [`Phase::ReturnPath`].
    pub fn phase(&self) -> Phase {
        self.core.phase
    }

    /// Counters and tallies so far (`ram.page_requests` is QEMU's postcopy-requests).
    pub fn stats(&self) -> &Stats {
        &self.core.stats
    }

    /// The next queued event, oldest first.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.core.events.pop_front()
    }

    /// The SHUT code, once seen.
    pub fn shut_code(&self) -> Option<u32> {
        self.shut
    }

    /// How the return path ended: SHUT 0 is [`Outcome::Completed`], a non-zero SHUT is
    /// [`Outcome::Failed`]; closing without SHUT or mid-message is [`Outcome::Truncated`].
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
        let boundary = self.io.want() == Want::Header(4, Hdr::Msg) && self.io.gathered().is_empty();
        match self.shut {
            Some(0) if boundary => Outcome::Completed,
            Some(code) if code != 0 => Outcome::Failed { code },
            _ => Outcome::Truncated,
        }
    }
}
