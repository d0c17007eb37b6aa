//! Multifd channels (docs/qemu-stream.md §7): a 64-byte initial packet, then packets of a
//! fixed-size header (320 + 8·524288/P bytes for RAM, 276 for device state) and a payload
//! skipped by count.
//!
//! Multifd packets carry no phase markers: their bytes go to the phase the owner sets with
//! `StreamParser::follow_phase`. One exception: a packet with pages during setup starts
//! pre-copy (its `PhaseChanged` event tells the owner). QEMU's multifd channels may send the
//! first pages before the main channel's first RAM section, and QEMU counts them as
//! pre-copy.

use super::bytes::{be32, be64, name_hash};
use super::stepper::{Step, Stepper, Want};
use super::wire::*;
use super::{Core, DesyncReason, EventKind};

/// A multifd RAM packet that carried pages, as reported by [`EventKind::MultifdPacket`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MultifdPacket {
    /// QEMU's packet number (global across the channels of one migration).
    pub packet_num: u64,
    /// Hash of the RAMBlock name (FNV-1a), to compare blocks across channels.
    pub block: u64,
    /// Normal pages in the packet.
    pub normal_pages: u32,
    /// Offset of the first normal page in its block.
    pub first_offset: u64,
    /// Offset of the last normal page in its block.
    pub last_offset: u64,
}

/// Number of recent packets a [`MultifdLedger`] remembers.
const LEDGER_SLOTS: usize = 256;

/// How far apart in packet numbers a repeat may be (see [`MultifdLedger`]).
const REPEAT_REACH: u64 = 4;

/// Cross-channel view of multifd packets, to rebuild QEMU's `normal` counter exactly.
///
/// QEMU 7.2 sometimes sends the last page of a packet again as the first page of the packet
/// it sends next (58 of 46,284 pages in one 2-channel capture on VM-C): its `multifd-bytes`
/// counts both copies, its `normal` counter only one. Packet numbers run across all the
/// channels of a migration, so only an observer of every channel sees this. "Next" is not
/// always the next number: at a sync round 7.2 renumbers the packets still queued on each
/// channel with the sync numbers, so the repeat may come up to [`REPEAT_REACH`] numbers
/// later (packet 515, then 519 on the same channel, 516 and 517 never seen, 518 on the other
/// channel with later pages). A packet counts as a repeat of the nearest packet at most that
/// far before it whose last page (same RAM block) is its first, each packet's last page
/// repeated at most once. Pages re-sent because the guest dirtied them again come a whole
/// pass later, hundreds of packets away. Feed it every [`EventKind::MultifdPacket`] of a
/// migration, in any order, and subtract [`MultifdLedger::repeated_pages`] from the summed
/// `normal_pages`. Fixed size: remembers the last 256 packet numbers.
#[derive(Debug, Clone)]
pub struct MultifdLedger {
    slots: [Option<Seen>; LEDGER_SLOTS],
    repeated: u64,
}

/// A remembered packet and which of its ends already took part in a repeat.
#[derive(Debug, Clone, Copy)]
struct Seen {
    p: MultifdPacket,
    /// Its first page was counted as a repeat of an earlier packet's last page.
    head: bool,
    /// Its last page was counted as repeated by a later packet.
    tail: bool,
}

impl Default for MultifdLedger {
    fn default() -> Self {
        Self::new()
    }
}

impl MultifdLedger {
    /// An empty ledger.
    pub fn new() -> Self {
        MultifdLedger {
            slots: [None; LEDGER_SLOTS],
            repeated: 0,
        }
    }

    fn index(num: u64) -> usize {
        (num % LEDGER_SLOTS as u64) as usize
    }

    fn seen(&mut self, num: u64) -> Option<&mut Seen> {
        self.slots[Self::index(num)]
            .as_mut()
            .filter(|s| s.p.packet_num == num)
    }

    /// Records one packet, from any channel, in any order.
    pub fn record(&mut self, p: &MultifdPacket) {
        if p.normal_pages == 0 || self.seen(p.packet_num).is_some() {
            return;
        }
        let mut me = Seen {
            p: *p,
            head: false,
            tail: false,
        };
        for d in 1..=REPEAT_REACH {
            let Some(a) = p.packet_num.checked_sub(d).and_then(|n| self.seen(n)) else {
                continue;
            };
            if !a.tail && a.p.block == p.block && a.p.last_offset == p.first_offset {
                a.tail = true;
                me.head = true;
                self.repeated += 1;
                break;
            }
        }
        for d in 1..=REPEAT_REACH {
            let Some(b) = p.packet_num.checked_add(d).and_then(|n| self.seen(n)) else {
                continue;
            };
            if !b.head && b.p.block == p.block && p.last_offset == b.p.first_offset {
                b.head = true;
                me.tail = true;
                self.repeated += 1;
                break;
            }
        }
        self.slots[Self::index(p.packet_num)] = Some(me);
    }

    /// Pages sent at the head of a packet right after being the tail of the previous one.
    pub fn repeated_pages(&self) -> u64 {
        self.repeated
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hdr {
    Init,
    /// Magic, version, flags.
    Common,
    /// The rest of the fixed RAM header (up to 320 bytes).
    Ram,
    /// The rest of the device-state header (up to 276 bytes).
    DeviceState,
    /// The first normal page's offset.
    FirstOffset,
    /// The last normal page's offset.
    LastOffset,
}

/// What follows a counted skip.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum After {
    LastOffset,
    PacketEnd,
}

/// The multifd channel parser.
#[derive(Debug)]
pub(super) struct MultifdParser {
    io: Stepper<Hdr, After>,
    /// Stream offset of the next byte to consume.
    pos: u64,
    /// Stream offset where the packet being read began.
    unit: u64,
    page_size: u32,
    /// Whether `page_size` was given (or learned from a header) rather than assumed.
    page_known: bool,
    flags: u32,
    /// Start of the packet being parsed, for the byte counter.
    packet_start: u64,
    /// The RAM packet being parsed.
    packet: MultifdPacket,
    /// Bytes after the last normal page's offset: the rest of the array and the payload.
    tail: u64,
}

impl MultifdParser {
    pub(super) fn new(page_hint: Option<u32>) -> Self {
        MultifdParser {
            io: Stepper::new(Want::Header(MULTIFD_INIT_LEN, Hdr::Init)),
            pos: 0,
            unit: 0,
            page_size: page_hint.unwrap_or(DEFAULT_PAGE_SIZE),
            page_known: page_hint.is_some(),
            flags: 0,
            packet_start: 0,
            packet: MultifdPacket {
                packet_num: 0,
                block: 0,
                normal_pages: 0,
                first_offset: 0,
                last_offset: 0,
            },
            tail: 0,
        }
    }

    pub(super) fn set_page_size_hint(&mut self, p: u32) {
        self.page_size = p;
        self.page_known = true;
    }

    /// Whether the channel stands between two packets.
    pub(super) fn at_boundary(&self) -> bool {
        matches!(self.io.want(), Want::Header(_, Hdr::Common) | Want::Opaque)
            && self.io.gathered().is_empty()
    }

    fn page_count(&self) -> u64 {
        MULTIFD_PACKET_SIZE / u64::from(self.page_size)
    }

    pub(super) fn feed(&mut self, core: &mut Core, data: &[u8]) {
        let mut i = 0;
        while i < data.len() {
            let (used, step) = self.io.step(&data[i..]);
            i += used;
            self.pos += used as u64;
            match step {
                Step::Pending => {}
                Step::Opaque => core.stats.opaque_bytes += used as u64,
                Step::Header(h) => self.on_hdr(core, h),
                Step::Body(after) => self.after_skip(core, after),
            }
        }
        // During setup, a packet header still being gathered may turn out to carry pages
        // and start pre-copy at its first byte: its bytes wait until that is known.
        let deciding = core.phase == super::Phase::Setup
            && matches!(self.io.want(), Want::Header(_, Hdr::Common | Hdr::Ram));
        core.attribute(if deciding {
            self.packet_start.min(self.pos)
        } else {
            self.pos
        });
    }

    /// Opaque for good: the rest of the stream is only counted.
    pub(super) fn is_opaque(&self) -> bool {
        self.io.want() == Want::Opaque
    }

    fn go_opaque(&mut self, core: &mut Core, reason: DesyncReason) {
        core.stats.opaque_bytes += self.pos - self.unit;
        core.desync(self.unit, reason);
        self.io.opaque();
    }

    fn next_packet(&mut self) {
        self.unit = self.pos;
        self.packet_start = self.pos;
        self.io.gather(12, Hdr::Common);
    }

    fn skip(&mut self, core: &mut Core, n: u64, after: After) {
        self.io.skip(n, after);
        if n == 0 {
            self.after_skip(core, after);
        }
    }

    fn after_skip(&mut self, core: &mut Core, after: After) {
        match after {
            After::LastOffset => self.io.gather(8, Hdr::LastOffset),
            After::PacketEnd => self.packet_done(core),
        }
    }

    fn packet_done(&mut self, core: &mut Core) {
        core.stats.ram.multifd_bytes += self.pos - self.packet_start;
        core.stats.ram.multifd_packets += 1;
        self.next_packet();
    }

    fn on_hdr(&mut self, core: &mut Core, h: Hdr) {
        let b = self.io.header();
        let at = |o: usize| be32(&b[o..]);
        match h {
            Hdr::Init => {
                if at(0) != MULTIFD_MAGIC || at(4) != MULTIFD_VERSION {
                    self.go_opaque(core, DesyncReason::BadMultifdPacket);
                } else {
                    self.next_packet();
                }
            }
            Hdr::Common => {
                let (magic, version, flags) = (at(0), at(4), at(8));
                if magic != MULTIFD_MAGIC || version != MULTIFD_VERSION {
                    self.go_opaque(core, DesyncReason::BadMultifdPacket);
                    return;
                }
                self.flags = flags;
                // The rest of the header follows the common part in the same buffer.
                if flags & MULTIFD_FLAG_DEVICE_STATE != 0 {
                    self.io
                        .gather_more(MULTIFD_DEVICE_STATE_HDR_LEN, Hdr::DeviceState);
                } else {
                    self.io.gather_more(MULTIFD_PACKET_FIXED_LEN, Hdr::Ram);
                }
            }
            Hdr::DeviceState => {
                let size = at(272);
                self.skip(core, u64::from(size), After::PacketEnd);
            }
            Hdr::FirstOffset | Hdr::LastOffset => {
                let off = be64(b);
                let n = u64::from(self.packet.normal_pages);
                if h == Hdr::FirstOffset {
                    self.packet.first_offset = off;
                    if n >= 2 {
                        self.skip(core, 8 * (n - 2), After::LastOffset);
                        return;
                    }
                }
                self.packet.last_offset = off;
                core.push(self.packet_start, EventKind::MultifdPacket(self.packet));
                self.skip(core, self.tail, After::PacketEnd);
            }
            Hdr::Ram => self.on_ram_header(core),
        }
    }

    /// The fixed RAM packet header is complete: count its pages, then read the offsets of
    /// the first and last normal page and skip the rest of the packet.
    fn on_ram_header(&mut self, core: &mut Core) {
        let b = self.io.header();
        let at = |o: usize| be32(&b[o..]);
        let (pages_alloc, normal, next_size, zero) = (at(12), at(16), at(20), at(32));
        if !self.page_known && pages_alloc.is_power_of_two() && (8..=512).contains(&pages_alloc) {
            // 7.2-9.x: pages_alloc is the packet's page count, so it gives P.
            self.page_size = (MULTIFD_PACKET_SIZE / u64::from(pages_alloc)) as u32;
            self.page_known = true;
        }
        let count = self.page_count();
        let used = u64::from(normal) + u64::from(zero);
        let compressed = self.flags & MULTIFD_FLAG_COMPRESSION_MASK != 0;
        let max_payload = count * u64::from(self.page_size);
        // QEMU reads a payload only for packets with normal pages (7.2 leaves a stale
        // next_packet_size in empty SYNC packets).
        let payload = if normal == 0 {
            0
        } else if compressed {
            u64::from(next_size)
        } else {
            u64::from(normal) * u64::from(self.page_size)
        };
        if used > count || payload > 2 * max_payload + 4096 {
            self.go_opaque(core, DesyncReason::BadMultifdPacket);
            return;
        }
        if normal > 0 && core.phase == super::Phase::Setup {
            // Pages are pre-copy, even ahead of the main channel's first RAM section.
            core.set_phase(super::Phase::Precopy, self.packet_start);
        }
        core.stats.ram.normal_pages += u64::from(normal);
        core.stats.ram.zero_pages += u64::from(zero);
        let name = &b[64..MULTIFD_PACKET_FIXED_LEN];
        let name_len = name.iter().position(|&c| c == 0).unwrap_or(name.len());
        self.packet = MultifdPacket {
            packet_num: be64(&b[24..]),
            block: name_hash(&name[..name_len]),
            normal_pages: normal,
            first_offset: 0,
            last_offset: 0,
        };
        // Offsets of the normal pages come first in the array.
        self.tail = 8 * (count - u64::from(normal)) + payload;
        if normal == 0 {
            self.skip(core, self.tail, After::PacketEnd);
        } else {
            self.io.gather(8, Hdr::FirstOffset);
        }
    }
}
