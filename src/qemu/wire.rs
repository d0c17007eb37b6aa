//! Wire constants of the QEMU migration stream, with the QEMU source file that defines each.
//!
//! Values only: no parsing here. Every integer on the wire is big-endian. The grammar these
//! constants belong to is described in `docs/qemu-stream.md`.

/// Stream magic "QEVM" (`QEMU_VM_FILE_MAGIC`, `migration/savevm.c`).
pub const QEMU_VM_FILE_MAGIC: u32 = 0x5145_564d;
/// The only stream version in use (`QEMU_VM_FILE_VERSION`, `migration/savevm.c`).
pub const QEMU_VM_FILE_VERSION: u32 = 3;

/// Top-level record: end of the device state (`QEMU_VM_EOF`, `migration/savevm.h`).
pub const QEMU_VM_EOF: u8 = 0x00;
/// Top-level record: first section of a live iterable (`QEMU_VM_SECTION_START`).
pub const QEMU_VM_SECTION_START: u8 = 0x01;
/// Top-level record: one iteration of a live iterable (`QEMU_VM_SECTION_PART`).
pub const QEMU_VM_SECTION_PART: u8 = 0x02;
/// Top-level record: last section of a live iterable (`QEMU_VM_SECTION_END`).
pub const QEMU_VM_SECTION_END: u8 = 0x03;
/// Top-level record: complete state of a device (`QEMU_VM_SECTION_FULL`).
pub const QEMU_VM_SECTION_FULL: u8 = 0x04;
/// Nested VMState subsection marker; also used inside the configuration section
/// (`QEMU_VM_SUBSECTION`).
pub const QEMU_VM_SUBSECTION: u8 = 0x05;
/// Top-level record: JSON description of the device state (`QEMU_VM_VMDESCRIPTION`).
pub const QEMU_VM_VMDESCRIPTION: u8 = 0x06;
/// Top-level record: configuration section, right after the header (`QEMU_VM_CONFIGURATION`).
pub const QEMU_VM_CONFIGURATION: u8 = 0x07;
/// Top-level record: command (`QEMU_VM_COMMAND`).
pub const QEMU_VM_COMMAND: u8 = 0x08;
/// Footer closing every section: `7e` + be32 section id (`QEMU_VM_SECTION_FOOTER`).
pub const QEMU_VM_SECTION_FOOTER: u8 = 0x7e;

/// Command: the destination opens the return path (`MIG_CMD_OPEN_RETURN_PATH`, `savevm.c`).
pub const MIG_CMD_OPEN_RETURN_PATH: u16 = 1;
/// Command: be32 value, answered by an RP PONG (`MIG_CMD_PING`).
pub const MIG_CMD_PING: u16 = 2;
/// Command: postcopy advise; 16 bytes when postcopy-ram is on (`MIG_CMD_POSTCOPY_ADVISE`).
pub const MIG_CMD_POSTCOPY_ADVISE: u16 = 3;
/// Command: first command inside the package (`MIG_CMD_POSTCOPY_LISTEN`).
pub const MIG_CMD_POSTCOPY_LISTEN: u16 = 4;
/// Command: last command inside the package (`MIG_CMD_POSTCOPY_RUN`).
pub const MIG_CMD_POSTCOPY_RUN: u16 = 5;
/// Command: pages the destination must drop (`MIG_CMD_POSTCOPY_RAM_DISCARD`).
pub const MIG_CMD_POSTCOPY_RAM_DISCARD: u16 = 6;
/// Command: be32 N, then N bytes of nested stream (`MIG_CMD_PACKAGED`).
pub const MIG_CMD_PACKAGED: u16 = 7;
/// Command: COLO follows; out of scope (`MIG_CMD_ENABLE_COLO`).
pub const MIG_CMD_ENABLE_COLO: u16 = 8;
/// Command: postcopy recovery resumes (`MIG_CMD_POSTCOPY_RESUME`).
pub const MIG_CMD_POSTCOPY_RESUME: u16 = 9;
/// Command: ask the destination for a block's received bitmap (`MIG_CMD_RECV_BITMAP`).
pub const MIG_CMD_RECV_BITMAP: u16 = 10;
/// Command: the VM has stopped, switchover starts (10.0+, `MIG_CMD_SWITCHOVER_START`).
pub const MIG_CMD_SWITCHOVER_START: u16 = 11;
/// Largest command number defined up to QEMU 10.2.
pub const MIG_CMD_MAX: u16 = MIG_CMD_SWITCHOVER_START;
/// Payload length of the PACKAGED command (be32 blob length).
pub const PACKAGED_LEN: u16 = 4;
/// Payload length of a POSTCOPY_ADVISE that announces postcopy-ram.
pub const ADVISE_RAM_LEN: u16 = 16;
/// The PING value QEMU sends right before the package when switching to postcopy.
pub const PING_BEFORE_PACKAGE: u32 = 2;

/// RAM record flag: obsolete full page, never sent (`RAM_SAVE_FLAG_FULL`, `migration/ram.c`).
pub const RAM_SAVE_FLAG_FULL: u64 = 0x001;
/// RAM record flag: zero page, one `00` byte follows (`RAM_SAVE_FLAG_ZERO`).
pub const RAM_SAVE_FLAG_ZERO: u64 = 0x002;
/// RAM record flag: RAMBlock list, START section only (`RAM_SAVE_FLAG_MEM_SIZE`).
pub const RAM_SAVE_FLAG_MEM_SIZE: u64 = 0x004;
/// RAM record flag: raw page of P bytes (`RAM_SAVE_FLAG_PAGE`).
pub const RAM_SAVE_FLAG_PAGE: u64 = 0x008;
/// RAM record flag: end of this section's RAM payload (`RAM_SAVE_FLAG_EOS`).
pub const RAM_SAVE_FLAG_EOS: u64 = 0x010;
/// RAM record modifier: same block as the previous page on this channel, no idstr
/// (`RAM_SAVE_FLAG_CONTINUE`).
pub const RAM_SAVE_FLAG_CONTINUE: u64 = 0x020;
/// RAM record flag: XBZRLE-encoded page (`RAM_SAVE_FLAG_XBZRLE`).
pub const RAM_SAVE_FLAG_XBZRLE: u64 = 0x040;
/// RAM record flag: RDMA hook, never on TCP (`RAM_SAVE_FLAG_HOOK`).
pub const RAM_SAVE_FLAG_HOOK: u64 = 0x080;
/// RAM record flag: zlib-compressed page, up to 9.0 (`RAM_SAVE_FLAG_COMPRESS_PAGE`).
pub const RAM_SAVE_FLAG_COMPRESS_PAGE: u64 = 0x100;
/// RAM record flag: multifd sync point on the main channel, 8.0+ (`RAM_SAVE_FLAG_MULTIFD_FLUSH`).
pub const RAM_SAVE_FLAG_MULTIFD_FLUSH: u64 = 0x200;
/// Mask covering every defined RAM flag (all flags are below 0x400).
pub const RAM_FLAGS_MASK: u64 = 0x3ff;
/// The one encoding byte an XBZRLE record carries (`ENCODING_FLAG_XBZRLE`).
pub const ENCODING_FLAG_XBZRLE: u8 = 0x01;

/// Configuration subsection naming the target page bits (`configuration/target-page-bits`).
pub const CONFIG_TARGET_PAGE_BITS: &[u8] = b"configuration/target-page-bits";
/// Configuration subsection listing validated capabilities (`configuration/capabilities`).
pub const CONFIG_CAPABILITIES: &[u8] = b"configuration/capabilities";
/// Configuration subsection carrying the VM UUID (`configuration/uuid`).
pub const CONFIG_UUID: &[u8] = b"configuration/uuid";
/// The capability that adds a guest-physical address to each MEM_SIZE block.
pub const CAP_X_IGNORE_SHARED: &[u8] = b"x-ignore-shared";
/// Idstr of the RAM live section.
pub const RAM_IDSTR: &[u8] = b"ram";

/// Return-path message: be32 status, the last message (`MIG_RP_MSG_SHUT`, `migration.c`).
pub const MIG_RP_MSG_SHUT: u16 = 1;
/// Return-path message: be32 echo of a PING (`MIG_RP_MSG_PONG`).
pub const MIG_RP_MSG_PONG: u16 = 2;
/// Return-path message: page request naming its block (`MIG_RP_MSG_REQ_PAGES_ID`).
pub const MIG_RP_MSG_REQ_PAGES_ID: u16 = 3;
/// Return-path message: page request in the previous block (`MIG_RP_MSG_REQ_PAGES`).
pub const MIG_RP_MSG_REQ_PAGES: u16 = 4;
/// Return-path message: received bitmap, with an unframed trailer (`MIG_RP_MSG_RECV_BITMAP`).
pub const MIG_RP_MSG_RECV_BITMAP: u16 = 5;
/// Return-path message: be32 1, recovery acknowledged (`MIG_RP_MSG_RESUME_ACK`).
pub const MIG_RP_MSG_RESUME_ACK: u16 = 6;
/// Return-path message: switchover may proceed, 8.1+ (`MIG_RP_MSG_SWITCHOVER_ACK`).
pub const MIG_RP_MSG_SWITCHOVER_ACK: u16 = 7;
/// Largest return-path message payload QEMU sends (`MIG_RP_MSG` framing, `migration.c`).
pub const MIG_RP_MAX_LEN: u16 = 512;
/// End mark after a RECV_BITMAP trailer (`RAMBLOCK_RECV_BITMAP_ENDING`, `migration/ram.c`).
pub const RAMBLOCK_RECV_BITMAP_ENDING: u64 = 0x0123_4567_89ab_cdef;

/// Multifd magic, first word of the initial packet and of every packet
/// (`MULTIFD_MAGIC`, `migration/multifd.c`).
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// Multifd protocol version (`MULTIFD_VERSION`).
pub const MULTIFD_VERSION: u32 = 1;
/// Length of the multifd initial packet (`MultiFDInit_t`).
pub const MULTIFD_INIT_LEN: usize = 64;
/// Multifd packet flag: synchronisation point (`MULTIFD_FLAG_SYNC`).
pub const MULTIFD_FLAG_SYNC: u32 = 0x01;
/// Multifd packet flags: compression method, bits 1-5 (`MULTIFD_FLAG_COMPRESSION_MASK`).
pub const MULTIFD_FLAG_COMPRESSION_MASK: u32 = 0x3e;
/// Multifd packet flag: device state packet, 10.0+ (`MULTIFD_FLAG_DEVICE_STATE`).
pub const MULTIFD_FLAG_DEVICE_STATE: u32 = 0x40;
/// Fixed part of a multifd RAM packet header before the offsets array (`MultiFDPacket_t`).
pub const MULTIFD_PACKET_FIXED_LEN: usize = 320;
/// Length of a multifd device-state packet header (`MultiFDPacketDeviceState_t`).
pub const MULTIFD_DEVICE_STATE_HDR_LEN: usize = 276;
/// Bytes of guest RAM one multifd packet may describe (`MULTIFD_PACKET_SIZE`).
pub const MULTIFD_PACKET_SIZE: u64 = 512 * 1024;

/// Page size assumed for targets that do not announce it (x86, ppc64, s390x, riscv).
pub const DEFAULT_PAGE_SIZE: u32 = 4096;
/// Page sizes tried, in order, when the assumed one fails validation (docs/qemu-stream.md §3.2).
pub const PAGE_SIZE_CANDIDATES: [u32; 4] = [4096, 8192, 16384, 65536];
/// Smallest page size QEMU supports (TARGET_PAGE_BITS_MIN 10).
pub const MIN_PAGE_SIZE: u32 = 1024;
/// Largest page size this parser accepts.
pub const MAX_PAGE_SIZE: u32 = 65536;
