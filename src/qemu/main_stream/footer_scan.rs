//! Skipping device sections (FULL, and START/PART/END of iterables other than `ram`), whose
//! layout only the device knows (docs/qemu-stream.md §5): scan for the section's footer,
//! `7e` + be32 id, and accept a match only if a plausible record follows. The bytes read
//! ahead to validate a candidate are then replayed through the state machine, from a fixed
//! buffer, so the stream is never buffered beyond one header.

use super::super::bytes::{be16, be32};
use super::super::stepper::Want;
use super::super::wire::*;
use super::super::{Core, DesyncReason, MAX_HEADER_BYTES};
use super::{Hdr, MainParser};

/// Room for replayed look-ahead bytes (footer candidates are at most ~280 bytes).
pub(super) const REPLAY_CAP: usize = 2 * MAX_HEADER_BYTES;

/// Headers of the footer scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ScanHdr {
    /// A footer mark found while scanning the body of section `id`.
    Mark(u32),
    /// A footer candidate for section `id`, being validated.
    Cand(u32),
}

/// Result of validating a footer candidate.
enum Cand {
    /// Needs this many bytes in all.
    More(usize),
    Accept,
    Reject,
}

impl MainParser {
    pub(super) fn on_scan(&mut self, core: &mut Core, h: ScanHdr) {
        match h {
            ScanHdr::Mark(id) => {
                self.unit = self.pos - 1;
                // Held until the candidate is decided: footer or section body.
                self.hold = Some(self.unit);
                self.io.gather_more(5, ScanHdr::Cand(id).into());
            }
            ScanHdr::Cand(id) => self.check_candidate(core, id),
        }
    }

    /// At FIN: a footer + EOF as the very last bytes (no VMDESCRIPTION) ends the stream.
    pub(super) fn accept_final_footer(&mut self, core: &mut Core) {
        if let Want::Header(7, Hdr::Scan(ScanHdr::Cand(_))) = self.io.want() {
            let got = self.io.gathered();
            if got.len() == 6 && got[5] == QEMU_VM_EOF {
                self.top_record(core, QEMU_VM_EOF);
            }
        }
    }

    /// Validates the footer candidate in `self.io.header()` for section `id`.
    fn check_candidate(&mut self, core: &mut Core, id: u32) {
        match candidate(self.io.header(), id, |s| self.sections.get(s).is_some()) {
            Cand::More(n) => self.io.gather_more(n, ScanHdr::Cand(id).into()),
            Cand::Accept => {
                // The footer (5 bytes) closes the section; the rest is the next record.
                self.hold = None;
                self.schedule_replay(core, 5);
                self.top(core);
            }
            Cand::Reject => {
                self.hold = None;
                self.schedule_replay(core, 1);
                self.io
                    .find(QEMU_VM_SECTION_FOOTER, ScanHdr::Mark(id).into());
            }
        }
    }

    /// Rewinds to the candidate's byte `from`: the bytes after it are read again.
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

    /// Feeds scheduled replay bytes until none are left.
    pub(super) fn replay(&mut self, core: &mut Core) {
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
                    return;
                }
                self.replay[self.replay_len..self.replay_len + rest.len()].copy_from_slice(rest);
                self.replay_len += rest.len();
            }
        }
    }
}

/// Judges footer candidate `b` (`7e`, be32 id, then what follows) for section `id`;
/// `known` says whether a section id was introduced.
fn candidate(b: &[u8], id: u32, known: impl Fn(u32) -> bool) -> Cand {
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
        // After a device section, EOF ends the precopy stream: VMDESCRIPTION or the end of
        // the connection follows (the latter is settled in `accept_final_footer`).
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
            accept_if(be32(&b[7..11]) < 1 << 30)
        }
        QEMU_VM_COMMAND => {
            if b.len() < 10 {
                return Cand::More(10);
            }
            accept_if(plausible_command(be16(&b[6..8]), be16(&b[8..10])))
        }
        QEMU_VM_SECTION_PART | QEMU_VM_SECTION_END => {
            if b.len() < 10 {
                return Cand::More(10);
            }
            accept_if(known(be32(&b[6..10])))
        }
        QEMU_VM_SECTION_START | QEMU_VM_SECTION_FULL => section_start(b),
        _ => Cand::Reject,
    }
}

fn accept_if(ok: bool) -> Cand {
    if ok { Cand::Accept } else { Cand::Reject }
}

/// Whether command `cmd` may have payload length `len`.
fn plausible_command(cmd: u16, len: u16) -> bool {
    match cmd {
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
    }
}

/// A START/FULL header after the footer: printable idstr, small instance and version.
fn section_start(b: &[u8]) -> Cand {
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
    accept_if(name_ok && instance < 1 << 20 && version < 1 << 16)
}
