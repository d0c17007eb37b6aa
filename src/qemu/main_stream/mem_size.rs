//! The MEM_SIZE block list of the START `ram` section (docs/qemu-stream.md §3.1): the
//! guest RAM size, then each RAMBlock's name and used length, with a page size per block
//! after ADVISE and a guest address per block with `x-ignore-shared`. The block order is
//! what pass tracking compares page positions by.

use super::super::bytes::{be64, name_hash};
use super::super::{Core, DesyncReason};
use super::MainParser;

/// Most RAMBlocks remembered from the MEM_SIZE list for pass ordering.
const MAX_BLOCKS: usize = 64;
/// Block index used for RAM records whose block is not in the MEM_SIZE list.
pub(super) const UNLISTED_BLOCK: u16 = MAX_BLOCKS as u16;

/// Headers of the block list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum MemHdr {
    /// Length of a block name.
    IdLen,
    /// Block name + be64 used length.
    IdRest,
    /// After ADVISE, more blocks to come: `00` starts the be64 page size, anything else is
    /// the next block's name length.
    Peek,
    /// The other 7 bytes of a block's be64 page size.
    PageSizeRest,
    /// After ADVISE, last block: its be64 page size, or the next record's word.
    LastV,
    /// `x-ignore-shared`: the block's be64 guest address.
    Gaddr,
}

/// The RAMBlocks of the MEM_SIZE list, in order, by name hash.
#[derive(Debug)]
pub(super) struct Blocks {
    hashes: [u64; MAX_BLOCKS],
    len: usize,
}

impl Blocks {
    pub(super) fn new() -> Self {
        Blocks {
            hashes: [0; MAX_BLOCKS],
            len: 0,
        }
    }

    fn push(&mut self, h: u64) {
        if self.len < MAX_BLOCKS {
            self.hashes[self.len] = h;
            self.len += 1;
        }
    }

    /// The list position of the block whose name hashes to `h`, or [`UNLISTED_BLOCK`].
    pub(super) fn index(&self, h: u64) -> u16 {
        self.hashes[..self.len]
            .iter()
            .position(|&b| b == h)
            .map_or(UNLISTED_BLOCK, |i| i as u16)
    }
}

impl MainParser {
    pub(super) fn on_mem_size(&mut self, core: &mut Core, h: MemHdr) {
        let b = self.io.header();
        match h {
            MemHdr::IdLen => {
                let len = usize::from(b[0]);
                if len == 0 {
                    self.go_opaque(core, DesyncReason::BadMemSize);
                } else {
                    self.need(core, len + 8, MemHdr::IdRest);
                }
            }
            MemHdr::IdRest => {
                let name_len = b.len() - 8;
                let h = name_hash(&b[..name_len]);
                let used = be64(&b[name_len..]);
                self.blocks.push(h);
                self.block_listed(core, used);
            }
            MemHdr::Gaddr | MemHdr::PageSizeRest => self.next_block(core),
            MemHdr::Peek => {
                let len = usize::from(b[0]);
                if len == 0 {
                    self.need(core, 7, MemHdr::PageSizeRest);
                } else {
                    // It was the next block's name length.
                    self.need(core, len + 8, MemHdr::IdRest);
                }
            }
            MemHdr::LastV => {
                let v = be64(b);
                if v.is_power_of_two() && v >= 0x400 {
                    self.ram_word(core);
                } else {
                    // No page-size field: this is the next record's word.
                    self.rec_start = self.pos - 8;
                    self.on_ram_word(core, v);
                }
            }
        }
    }

    /// A block of `used` bytes was listed: read its extra fields, if any, then go on.
    fn block_listed(&mut self, core: &mut Core, used: u64) {
        self.mem_sum = self.mem_sum.saturating_add(used);
        if self.mem_sum > self.mem_total {
            self.go_opaque(core, DesyncReason::BadMemSize);
        } else if self.ignore_shared {
            self.need(core, 8, MemHdr::Gaddr);
        } else if self.postcopy_advised {
            if self.mem_sum < self.mem_total {
                self.need(core, 1, MemHdr::Peek);
            } else {
                self.need(core, 8, MemHdr::LastV);
            }
        } else {
            self.next_block(core);
        }
    }

    fn next_block(&mut self, core: &mut Core) {
        if self.mem_sum < self.mem_total {
            self.need(core, 1, MemHdr::IdLen);
        } else {
            self.ram_word(core);
        }
    }
}
