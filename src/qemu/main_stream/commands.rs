//! Commands (`08`, be16 cmd, be16 len, payload; docs/qemu-stream.md §4) and the PACKAGED
//! blob: the commands that start downtime, learn the page size or announce postcopy, and
//! the package, whose nested stream is parsed in place and whose end starts postcopy.

use super::super::bytes::{be16, be32, be64};
use super::super::stepper::Want;
use super::super::wire::*;
use super::super::{Core, DesyncReason, MAX_HEADER_BYTES, Phase};
use super::MainParser;
use super::page_size::PageSource;

/// `08`, be16 cmd, be16 len.
const CMD_HEADER_BYTES: usize = 5;

/// Headers of a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmdHdr {
    /// be16 cmd, be16 len.
    Head,
    /// The payload of this command.
    Body(u16),
}

impl MainParser {
    pub(super) fn on_cmd(&mut self, core: &mut Core, h: CmdHdr) {
        match h {
            CmdHdr::Head => {
                let b = self.io.header();
                let cmd = be16(b);
                let len = be16(&b[2..4]);
                let bad = match cmd {
                    0 => true,
                    MIG_CMD_PACKAGED => len != PACKAGED_LEN,
                    // The command's 5 header bytes are held with its body until the
                    // command is understood, and everything held fits MAX_HEADER_BYTES.
                    // QEMU's largest command (a DISCARD: 2 + 255 + 1 + 12 x 16 bytes) is
                    // well below.
                    _ => usize::from(len) > MAX_HEADER_BYTES - CMD_HEADER_BYTES,
                };
                if bad {
                    self.go_opaque(core, DesyncReason::BadCommand { cmd, len });
                } else {
                    self.need(core, usize::from(len), CmdHdr::Body(cmd));
                }
            }
            CmdHdr::Body(cmd) => self.on_command(core, cmd),
        }
    }

    /// A complete command `cmd` with its payload in `self.io.header()`.
    fn on_command(&mut self, core: &mut Core, cmd: u16) {
        let b = self.io.header();
        let n = b.len();
        let start = self.cmd_start;
        let before_downtime = matches!(core.phase, Phase::Setup | Phase::Precopy);
        match cmd {
            MIG_CMD_PING if n == 4 => {
                let v = be32(b);
                if v == PING_BEFORE_PACKAGE && self.postcopy_advised && before_downtime {
                    core.set_phase(Phase::Downtime, start);
                }
            }
            MIG_CMD_POSTCOPY_ADVISE if n == usize::from(ADVISE_RAM_LEN) => {
                let p = be64(&b[8..16]);
                self.postcopy_advised = true;
                if let Ok(p) = u32::try_from(p) {
                    self.set_page(core, p, PageSource::Advise);
                }
            }
            MIG_CMD_POSTCOPY_RAM_DISCARD | MIG_CMD_SWITCHOVER_START if before_downtime => {
                core.set_phase(Phase::Downtime, start);
            }
            MIG_CMD_PACKAGED => {
                let len = be32(b);
                self.open_package(core, len, before_downtime);
                return;
            }
            MIG_CMD_ENABLE_COLO => {
                self.hold = None;
                self.unit = self.pos;
                self.go_opaque(core, DesyncReason::Colo);
                return;
            }
            _ => {}
        }
        self.hold = None;
        self.top(core);
    }

    /// PACKAGED with a blob of `len` bytes: the blob is downtime, parsed as a nested stream.
    fn open_package(&mut self, core: &mut Core, len: u32, before_downtime: bool) {
        if self.pkg_end.is_some() {
            self.go_opaque(core, DesyncReason::NestedPackage);
            return;
        }
        if before_downtime {
            core.set_phase(Phase::Downtime, self.cmd_start);
        }
        self.hold = None;
        self.pkg_end = Some(self.pos + u64::from(len));
        self.top(core);
        if len == 0 {
            self.end_package(core);
        }
    }

    /// The PACKAGED blob ended: back to the main stream, in postcopy.
    pub(super) fn end_package(&mut self, core: &mut Core) {
        self.pkg_end = None;
        self.hold = None;
        core.set_phase(Phase::Postcopy, self.pos);
        if self.io.want() != Want::Opaque {
            self.top(core);
        }
    }
}
