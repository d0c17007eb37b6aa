//! The stream header and the configuration section (docs/qemu-stream.md §1): magic and
//! version, the machine type, then the subsections this parser can size (target page bits,
//! capabilities, UUID). Anything else in the configuration is unparseable.

use super::super::bytes::be32;
use super::super::wire::*;
use super::super::{Core, DesyncReason};
use super::MainParser;
use super::page_size::{PageSource, machine_page_size};

/// Headers of the stream start and the configuration section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConfigHdr {
    /// Magic + version (8).
    Header,
    /// First byte after the header: `07` or a record type.
    Peek,
    /// be32 length of the machine type.
    Len,
    /// The machine type.
    Name,
}

/// Headers of a configuration subsection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum SubHdr {
    /// Next byte: `05` (another subsection) or a record type.
    Peek,
    NameLen,
    /// Name + be32 version id.
    Name,
    PageBits,
    CapCount,
    /// Length of a capability name; this many names are left.
    CapLen(u32),
    CapName(u32),
    Uuid,
}

impl MainParser {
    pub(super) fn on_config(&mut self, core: &mut Core, h: ConfigHdr) {
        let b = self.io.header();
        match h {
            ConfigHdr::Header => {
                let version = be32(&b[4..8]);
                if be32(b) != QEMU_VM_FILE_MAGIC {
                    self.go_opaque(core, DesyncReason::UnknownChannel);
                } else if version != QEMU_VM_FILE_VERSION {
                    self.go_opaque(core, DesyncReason::BadVersion(version));
                } else {
                    self.need(core, 1, ConfigHdr::Peek);
                }
            }
            ConfigHdr::Peek => {
                let t = b[0];
                if t == QEMU_VM_CONFIGURATION {
                    self.need(core, 4, ConfigHdr::Len);
                } else {
                    self.top_record(core, t);
                }
            }
            ConfigHdr::Len => {
                let len = be32(b);
                if len as usize > 255 {
                    self.go_opaque(core, DesyncReason::BadConfig);
                } else {
                    self.need(core, len as usize, ConfigHdr::Name);
                }
            }
            ConfigHdr::Name => {
                let p = machine_page_size(b);
                self.set_page(core, p, PageSource::Machine);
                self.need(core, 1, SubHdr::Peek);
            }
        }
    }

    pub(super) fn on_subsection(&mut self, core: &mut Core, h: SubHdr) {
        let b = self.io.header();
        match h {
            SubHdr::Peek => {
                let t = b[0];
                if t == QEMU_VM_SUBSECTION {
                    self.need(core, 1, SubHdr::NameLen);
                } else {
                    self.top_record(core, t);
                }
            }
            SubHdr::NameLen => {
                let len = usize::from(b[0]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::UnknownSubsection);
                } else {
                    self.need(core, len + 4, SubHdr::Name);
                }
            }
            SubHdr::Name => {
                let name = &b[..b.len() - 4];
                if name == CONFIG_TARGET_PAGE_BITS {
                    self.need(core, 4, SubHdr::PageBits);
                } else if name == CONFIG_CAPABILITIES {
                    self.need(core, 4, SubHdr::CapCount);
                } else if name == CONFIG_UUID {
                    self.need(core, 16, SubHdr::Uuid);
                } else {
                    self.go_opaque(core, DesyncReason::UnknownSubsection);
                }
            }
            SubHdr::PageBits => {
                let bits = be32(b);
                if !(10..=16).contains(&bits) {
                    self.go_opaque(core, DesyncReason::BadConfig);
                } else {
                    self.set_page(core, 1 << bits, PageSource::Config);
                    self.need(core, 1, SubHdr::Peek);
                }
            }
            SubHdr::CapCount => {
                let count = be32(b);
                if count > 64 {
                    self.go_opaque(core, DesyncReason::BadConfig);
                } else if count == 0 {
                    self.need(core, 1, SubHdr::Peek);
                } else {
                    self.need(core, 1, SubHdr::CapLen(count));
                }
            }
            SubHdr::CapLen(left) => {
                let len = usize::from(b[0]);
                self.need(core, len, SubHdr::CapName(left));
            }
            SubHdr::CapName(left) => {
                if b == CAP_X_IGNORE_SHARED {
                    self.ignore_shared = true;
                }
                if left <= 1 {
                    self.need(core, 1, SubHdr::Peek);
                } else {
                    self.need(core, 1, SubHdr::CapLen(left - 1));
                }
            }
            SubHdr::Uuid => self.need(core, 1, SubHdr::Peek),
        }
    }
}
