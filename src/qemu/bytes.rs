//! Field readers shared by the parsers: big-endian integers from the front of a header, and
//! the block-name hash that lets channels compare RAMBlocks in fixed space.

/// be16 from the first 2 bytes of `b`.
pub(super) fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}

/// be32 from the first 4 bytes of `b`.
pub(super) fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// be64 from the first 8 bytes of `b`.
pub(super) fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]])
}

/// FNV-1a, to remember block names in fixed space.
pub(super) fn name_hash(name: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in name {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}
