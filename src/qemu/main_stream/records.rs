//! Top-level records (docs/qemu-stream.md §2): the record type byte, section headers and
//! footers, EOF and the VMDESCRIPTION, and the phase each record starts
//! (docs/qemu-stream.md §5). Commands are in [`super::commands`], the `ram` payload in
//! [`super::ram`].

use super::super::bytes::be32;
use super::super::wire::*;
use super::super::{Core, DesyncReason, EventKind, Phase};
use super::commands::CmdHdr;
use super::footer_scan::ScanHdr;
use super::{MainParser, Mode, SkipNext};

/// Most distinct section ids remembered (START/FULL); later ones are unknown.
const MAX_SECTIONS: usize = 256;

/// Whether the stream closes sections with footers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Footers {
    Unknown,
    Yes,
    No,
}

/// The kind of the section being parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SecType {
    Start,
    Part,
    End,
    Full,
}

/// The section being parsed.
#[derive(Debug, Clone, Copy)]
pub(super) struct Section {
    pub(super) id: u32,
    pub(super) ty: SecType,
}

/// Headers of top-level records and section framing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum RecordHdr {
    /// A top-level record type byte.
    TopType,
    /// START/FULL: be32 id + idstr length.
    SecFullHead(SecType),
    /// START/FULL: idstr + be32 instance + be32 version.
    SecFullRest(SecType, u32),
    /// PART/END: be32 id.
    SecId(SecType),
    /// be32 length of the VMDESCRIPTION JSON.
    VmdescLen,
    /// The byte after a RAM section's EOS: a footer or the next record.
    FooterPeek,
    /// The footer's be32 section id.
    FooterId,
}

/// The section ids introduced by START/FULL, and whether each is `ram`, in fixed space.
#[derive(Debug)]
pub(super) struct Sections {
    ids: [(u32, bool); MAX_SECTIONS],
    len: usize,
}

impl Sections {
    pub(super) fn new() -> Self {
        Sections {
            ids: [(0, false); MAX_SECTIONS],
            len: 0,
        }
    }

    /// Whether section `id` is `ram`, if it was introduced.
    pub(super) fn get(&self, id: u32) -> Option<bool> {
        self.ids[..self.len]
            .iter()
            .find(|(sid, _)| *sid == id)
            .map(|&(_, ram)| ram)
    }

    fn register(&mut self, id: u32, ram: bool) {
        if let Some(e) = self.ids[..self.len].iter_mut().find(|(sid, _)| *sid == id) {
            e.1 = ram;
        } else if self.len < MAX_SECTIONS {
            self.ids[self.len] = (id, ram);
            self.len += 1;
        }
    }
}

impl MainParser {
    /// Expects the next top-level record.
    pub(super) fn top(&mut self, core: &mut Core) {
        self.sec = None;
        self.need(core, 1, RecordHdr::TopType);
    }

    /// The kind of the section being parsed, if any.
    pub(super) fn sec_type(&self) -> Option<SecType> {
        self.sec.map(|s| s.ty)
    }

    pub(super) fn on_record(&mut self, core: &mut Core, h: RecordHdr) {
        let b = self.io.header();
        match h {
            RecordHdr::TopType => self.top_record(core, b[0]),
            RecordHdr::SecFullHead(ty) => {
                let id = be32(b);
                let len = usize::from(b[4]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::BadSectionHeader);
                } else {
                    self.need(core, len + 8, RecordHdr::SecFullRest(ty, id));
                }
            }
            RecordHdr::SecFullRest(ty, id) => {
                let is_ram = &b[..b.len() - 8] == RAM_IDSTR;
                self.sections.register(id, is_ram);
                self.open_section(core, id, ty, is_ram);
            }
            RecordHdr::SecId(ty) => {
                let id = be32(b);
                let ram = match self.sections.get(id) {
                    Some(ram) => ram,
                    // A recovery channel continues sections introduced on the old channel;
                    // only `ram` has PART/END there.
                    None if self.mode == Mode::Recovery => {
                        self.sections.register(id, true);
                        true
                    }
                    None => {
                        self.go_opaque(core, DesyncReason::UnknownSection(id));
                        return;
                    }
                };
                self.open_section(core, id, ty, ram);
            }
            RecordHdr::VmdescLen => {
                let len = be32(b);
                self.hold = None;
                self.io.skip(u64::from(len), SkipNext::VmdescEnd);
                if len == 0 {
                    self.vmdesc_end(core);
                }
            }
            RecordHdr::FooterPeek => self.footer_peek(core, b[0]),
            RecordHdr::FooterId => {
                let id = be32(b);
                if self.sec.map(|s| s.id) != Some(id) {
                    self.go_opaque(core, DesyncReason::BadFooter);
                } else {
                    self.top(core);
                }
            }
        }
    }

    /// The VMDESCRIPTION was skipped: nothing may follow.
    pub(super) fn vmdesc_end(&mut self, core: &mut Core) {
        self.ended = true;
        self.top(core);
    }

    /// After a RAM section's EOS: its footer, or (streams without footers) the next record.
    fn footer_peek(&mut self, core: &mut Core, b: u8) {
        if b == QEMU_VM_SECTION_FOOTER {
            self.footers = Footers::Yes;
            self.need(core, 4, RecordHdr::FooterId);
        } else if self.footers == Footers::Yes {
            self.go_opaque(core, DesyncReason::BadFooter);
        } else {
            self.footers = Footers::No;
            self.sec = None;
            self.top_record(core, b);
        }
    }

    /// A top-level record starts with type byte `t` (already consumed).
    pub(super) fn top_record(&mut self, core: &mut Core, t: u8) {
        let start = self.pos - 1;
        self.unit = start;
        self.sec = None;
        if self.ended || (self.saw_eof && t != QEMU_VM_VMDESCRIPTION) {
            self.go_opaque(core, DesyncReason::AfterEnd);
            return;
        }
        match t {
            QEMU_VM_EOF => self.on_eof(core, start),
            QEMU_VM_SECTION_START => self.section_header(core, SecType::Start, start),
            QEMU_VM_SECTION_FULL => self.section_header(core, SecType::Full, start),
            QEMU_VM_SECTION_PART => self.section_header(core, SecType::Part, start),
            QEMU_VM_SECTION_END => self.section_header(core, SecType::End, start),
            QEMU_VM_VMDESCRIPTION => {
                self.hold = None;
                self.need(core, 4, RecordHdr::VmdescLen);
                self.unit = start;
            }
            QEMU_VM_COMMAND => {
                // Held until the command says which phase it starts.
                self.hold = Some(start);
                self.cmd_start = start;
                self.need(core, 4, CmdHdr::Head);
                self.unit = start;
            }
            _ => {
                self.hold = None;
                self.go_opaque(core, DesyncReason::UnexpectedRecord(t));
            }
        }
    }

    /// QEMU_VM_EOF at `start`: the end of the device state (downtime unless in postcopy).
    fn on_eof(&mut self, core: &mut Core, start: u64) {
        if matches!(core.phase, Phase::Setup | Phase::Precopy) {
            core.set_phase(Phase::Downtime, start);
        }
        core.push(start, EventKind::Eof);
        self.saw_eof = true;
        if core.phase == Phase::Postcopy {
            self.ended = true;
        }
        self.hold = None;
        self.top(core);
    }

    /// A section record of type `ty` at `start`: the phase it starts
    /// (docs/qemu-stream.md §5), then its header.
    fn section_header(&mut self, core: &mut Core, ty: SecType, start: u64) {
        let before_downtime = matches!(core.phase, Phase::Setup | Phase::Precopy);
        match ty {
            SecType::Start => {}
            SecType::Full => {
                if self.seen_part && core.phase == Phase::Precopy {
                    core.set_phase(Phase::Downtime, start);
                }
            }
            SecType::Part => {
                if core.phase == Phase::Setup {
                    core.set_phase(Phase::Precopy, start);
                }
                if !self.seen_part && core.phase == Phase::Precopy {
                    // The first PART starts pass 1 (docs/qemu-stream.md §3.3).
                    core.stats.passes = 1;
                    core.push(start, EventKind::PassStarted { pass: 1 });
                }
                self.seen_part = true;
            }
            SecType::End => {
                if before_downtime {
                    core.set_phase(Phase::Downtime, start);
                }
            }
        }
        self.hold = None;
        match ty {
            SecType::Start | SecType::Full => self.need(core, 5, RecordHdr::SecFullHead(ty)),
            SecType::Part | SecType::End => self.need(core, 4, RecordHdr::SecId(ty)),
        }
        self.unit = start;
    }

    /// The section header is complete: parse a `ram` payload, skip anything else.
    fn open_section(&mut self, core: &mut Core, id: u32, ty: SecType, ram: bool) {
        self.sec = Some(Section { id, ty });
        if ram && ty != SecType::Full {
            // The CONTINUE state ("last sent block") carries over from section to section.
            self.ram_word(core);
        } else if self.footers == Footers::No {
            // The header parsed; the body is what cannot be skipped.
            self.unit = self.pos;
            self.go_opaque(core, DesyncReason::NoFooters);
        } else {
            self.io
                .find(QEMU_VM_SECTION_FOOTER, ScanHdr::Mark(id).into());
        }
    }
}
