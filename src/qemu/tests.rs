//! Unit tests on small hand-built streams: every record type, every channel kind, and
//! hostile input (garbage, truncation, mutations) fed whole, in random splits and byte by
//! byte.

use std::time::{Duration, Instant};

use super::wire::*;
use super::*;

/// Builds a stream byte by byte, with offsets to assert on.
#[derive(Default, Clone)]
struct B(Vec<u8>);

impl B {
    fn u8(&mut self, v: u8) -> &mut Self {
        self.0.push(v);
        self
    }
    fn be16(&mut self, v: u16) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be32(&mut self, v: u32) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn be64(&mut self, v: u64) -> &mut Self {
        self.0.extend_from_slice(&v.to_be_bytes());
        self
    }
    fn raw(&mut self, b: &[u8]) -> &mut Self {
        self.0.extend_from_slice(b);
        self
    }
    fn fill(&mut self, byte: u8, n: usize) -> &mut Self {
        self.0.extend(std::iter::repeat_n(byte, n));
        self
    }
    /// Counted string.
    fn s(&mut self, s: &str) -> &mut Self {
        self.u8(s.len() as u8).raw(s.as_bytes())
    }
    fn len(&self) -> u64 {
        self.0.len() as u64
    }
    fn header(&mut self, machine: &str) -> &mut Self {
        self.be32(QEMU_VM_FILE_MAGIC)
            .be32(3)
            .u8(QEMU_VM_CONFIGURATION);
        self.be32(machine.len() as u32).raw(machine.as_bytes())
    }
    fn section_start(&mut self, ty: u8, id: u32, idstr: &str) -> &mut Self {
        self.u8(ty).be32(id).s(idstr).be32(0).be32(4)
    }
    fn section(&mut self, ty: u8, id: u32) -> &mut Self {
        self.u8(ty).be32(id)
    }
    fn footer(&mut self, id: u32) -> &mut Self {
        self.u8(QEMU_VM_SECTION_FOOTER).be32(id)
    }
    fn eos(&mut self) -> &mut Self {
        self.be64(RAM_SAVE_FLAG_EOS)
    }
    /// A PAGE record; the block name is sent unless `cont`.
    fn page(&mut self, block: &str, offset: u64, p: usize, cont: bool) -> &mut Self {
        self.be64(offset | RAM_SAVE_FLAG_PAGE | if cont { RAM_SAVE_FLAG_CONTINUE } else { 0 });
        if !cont {
            self.s(block);
        }
        self.fill(0xa5, p)
    }
    fn zero(&mut self, block: &str, offset: u64, cont: bool) -> &mut Self {
        self.be64(offset | RAM_SAVE_FLAG_ZERO | if cont { RAM_SAVE_FLAG_CONTINUE } else { 0 });
        if !cont {
            self.s(block);
        }
        self.u8(0)
    }
    fn cmd(&mut self, cmd: u16, payload: &[u8]) -> &mut Self {
        self.u8(QEMU_VM_COMMAND)
            .be16(cmd)
            .be16(payload.len() as u16)
            .raw(payload)
    }
    fn ping(&mut self, v: u32) -> &mut Self {
        self.cmd(MIG_CMD_PING, &v.to_be_bytes())
    }
    /// START `ram` with a MEM_SIZE list of `(name, used_length)` and EOS + footer.
    fn ram_start(&mut self, id: u32, blocks: &[(&str, u64)]) -> &mut Self {
        self.section_start(QEMU_VM_SECTION_START, id, "ram");
        let total: u64 = blocks.iter().map(|b| b.1).sum();
        self.be64(total | RAM_SAVE_FLAG_MEM_SIZE);
        for (name, used) in blocks {
            self.s(name).be64(*used);
        }
        self.eos().footer(id)
    }
    /// A FULL device section whose body holds `body`.
    fn device(&mut self, id: u32, name: &str, body: &[u8]) -> &mut Self {
        self.section_start(QEMU_VM_SECTION_FULL, id, name)
            .raw(body)
            .footer(id)
    }
}

const P: usize = 4096;

fn now() -> Instant {
    // A fixed origin per test run; tests only compare offsets and kinds.
    Instant::now()
}

struct Run {
    stats: Stats,
    outcome: Outcome,
    events: Vec<(u64, EventKind)>,
    kind: Option<ChannelKind>,
}

fn run_chunks(data: &[u8], chunks: impl IntoIterator<Item = usize>) -> Run {
    let t = now();
    let mut p = StreamParser::new();
    let mut events = Vec::new();
    let mut at = 0;
    for n in chunks {
        let end = (at + n).min(data.len());
        p.feed(&data[at..end], t);
        at = end;
        // Invariant at every step: nothing lost, little held back.
        let s = p.stats();
        assert_eq!(s.phases.sum() + s.unattributed_bytes, s.total_bytes);
        assert!(s.unattributed_bytes <= MAX_HEADER_BYTES as u64);
        while let Some(e) = p.poll_event() {
            events.push((e.offset, e.kind));
        }
    }
    p.feed(&data[at..], t);
    p.finish(t);
    while let Some(e) = p.poll_event() {
        events.push((e.offset, e.kind));
    }
    let stats = *p.stats();
    assert_eq!(stats.total_bytes, data.len() as u64);
    assert_eq!(
        stats.phases.sum(),
        stats.total_bytes,
        "phases must sum to the total"
    );
    assert_eq!(stats.unattributed_bytes, 0);
    Run {
        stats,
        outcome: p.outcome(),
        events,
        kind: p.channel(),
    }
}

/// Parses `data` whole, byte by byte and in pseudo-random splits; asserts all agree.
fn run(data: &[u8]) -> Run {
    let whole = run_chunks(data, []);
    let bytewise = run_chunks(data, std::iter::repeat_n(1, data.len()));
    let mut seed = data.len() as u64 | 1;
    let mut splits = Vec::new();
    let mut left = data.len();
    while left > 0 {
        seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        let n = ((seed >> 33) % 700 + 1) as usize;
        splits.push(n.min(left));
        left -= n.min(left);
    }
    let split = run_chunks(data, splits);
    for other in [&bytewise, &split] {
        assert_eq!(other.stats, whole.stats);
        assert_eq!(other.outcome, whole.outcome);
        assert_eq!(other.events, whole.events);
        assert_eq!(other.kind, whole.kind);
    }
    whole
}

fn phase_changes(r: &Run) -> Vec<(u64, Phase)> {
    r.events
        .iter()
        .filter_map(|&(o, k)| match k {
            EventKind::PhaseChanged { to, .. } => Some((o, to)),
            _ => None,
        })
        .collect()
}

/// A complete small precopy migration. Returns the stream and the phase boundaries.
fn precopy_stream() -> (Vec<u8>, [u64; 3]) {
    let mut b = B::default();
    b.header("pc-i440fx-7.2");
    b.ram_start(2, &[("pc.ram", 4 * P as u64), ("pc.bios", P as u64)]);
    b.device(3, "early", &[1, 2, 3]);
    let precopy = b.len();
    // Pass 1: PAGE, ZERO (continue), other block PAGE.
    b.section(QEMU_VM_SECTION_PART, 2);
    b.page("pc.ram", 0, P, false).zero("", P as u64, true);
    b.page("pc.bios", 0, P, false).eos().footer(2);
    // Empty PART (18 bytes).
    b.section(QEMU_VM_SECTION_PART, 2).eos().footer(2);
    let downtime = b.len();
    b.section(QEMU_VM_SECTION_END, 2);
    b.page("pc.ram", 2 * P as u64, P, false)
        .zero("", 3 * P as u64, true);
    b.eos().footer(2);
    // Device bodies with footer look-alikes that must be rejected.
    b.device(
        4,
        "timer",
        &[0x7e, 0, 0, 0, 4, 0, 0x42, 0x7e, 0, 0, 0, 4, 2, 0, 0, 0, 99],
    );
    b.device(5, "cpu", &[0x7e, 0x7e, 0, 0, 0, 5, 1, 0, 0, 0, 1, 0]);
    b.u8(QEMU_VM_EOF);
    b.u8(QEMU_VM_VMDESCRIPTION).be32(7).raw(b"{\"a\":1}");
    (b.0, [precopy, downtime, 0])
}

#[test]
fn precopy_stream_phases_and_counters() {
    let (data, [precopy, downtime, _]) = precopy_stream();
    let r = run(&data);
    assert_eq!(r.kind, Some(ChannelKind::Main));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(
        phase_changes(&r),
        vec![(precopy, Phase::Precopy), (downtime, Phase::Downtime)]
    );
    let s = r.stats;
    assert_eq!(s.phases.setup, precopy);
    assert_eq!(s.phases.precopy, downtime - precopy);
    assert_eq!(s.phases.downtime, data.len() as u64 - downtime);
    assert_eq!(s.opaque_bytes, 0);
    assert_eq!(s.page_size, Some(4096));
    assert_eq!(s.passes, 1);
    // Precopy RAM: (8+7+P) + (8+1) + (8+8+P) + EOS 8, plus the empty PART's EOS 8.
    let pre = (8 + 7 + P) + 9 + (8 + 8 + P) + 8 + 8;
    assert_eq!(s.ram.precopy_bytes, pre as u64);
    // Downtime RAM: (8+7+P) + 9; the END's EOS is not counted.
    assert_eq!(s.ram.downtime_bytes, (8 + 7 + P + 9) as u64);
    assert_eq!(s.ram.normal_pages, 3);
    assert_eq!(s.ram.zero_pages, 2);
    assert!(r.events.iter().any(|e| e.1 == EventKind::Eof));
}

#[test]
fn pass_counter_counts_backward_steps_and_flushes() {
    let mut b = B::default();
    b.header("pc-q35-9.2");
    b.ram_start(2, &[("pc.ram", 8 * P as u64), ("vga", P as u64)]);
    let pass1 = b.len();
    b.section(QEMU_VM_SECTION_PART, 2);
    b.zero("pc.ram", 0, false)
        .zero("", 5 * P as u64, true)
        .zero("vga", 0, false);
    b.eos().footer(2);
    let pass2 = b.len() + 5;
    b.section(QEMU_VM_SECTION_PART, 2);
    b.zero("pc.ram", P as u64, false)
        .zero("", 2 * P as u64, true)
        .eos()
        .footer(2);
    // A MULTIFD_FLUSH marks a wrap (per-round multifd): the next page starts pass 3 even
    // though it moves forward.
    b.section(QEMU_VM_SECTION_PART, 2);
    b.be64(RAM_SAVE_FLAG_MULTIFD_FLUSH);
    let pass3 = b.len();
    b.zero("", 7 * P as u64, true).eos().footer(2);
    b.section(QEMU_VM_SECTION_END, 2).eos().footer(2);
    b.u8(QEMU_VM_EOF);
    let r = run(&b.0);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.stats.passes, 3);
    let passes: Vec<_> = r
        .events
        .iter()
        .filter_map(|&(o, k)| match k {
            EventKind::PassStarted { pass } => Some((o, pass)),
            _ => None,
        })
        .collect();
    assert_eq!(passes, vec![(pass1, 1), (pass2, 2), (pass3, 3)]);
    // MULTIFD_FLUSH is not counted in precopy-bytes; the EOS of every PART is.
    let zero = |named: usize| (8 + named + 1) as u64;
    let expected = zero(7) + zero(0) + zero(4) + 8 + zero(7) + zero(0) + 8 + zero(0) + 8;
    assert_eq!(r.stats.ram.precopy_bytes, expected);
}

/// The postcopy sequence of docs/qemu-stream.md §4.1 D, with a hugepage block in MEM_SIZE.
fn postcopy_stream() -> (Vec<u8>, [u64; 3]) {
    let mut b = B::default();
    b.header("pc-i440fx-7.2");
    b.cmd(MIG_CMD_OPEN_RETURN_PATH, &[]).ping(1);
    let mut advise = Vec::new();
    advise.extend_from_slice(&(0x20_0000u64 | 4096).to_be_bytes());
    advise.extend_from_slice(&4096u64.to_be_bytes());
    b.cmd(MIG_CMD_POSTCOPY_ADVISE, &advise);
    // MEM_SIZE with postcopy: hugepage block (page size field), a normal block, and a last
    // hugepage block (field decided by the power-of-two rule).
    b.section_start(QEMU_VM_SECTION_START, 7, "ram");
    b.be64((0x40_0000 + 4 * P as u64 + 0x20_0000) | RAM_SAVE_FLAG_MEM_SIZE);
    b.s("huge").be64(0x40_0000).be64(0x20_0000);
    b.s("pc.ram").be64(4 * P as u64);
    b.s("huge2").be64(0x20_0000).be64(0x20_0000);
    b.eos().footer(7);
    let precopy = b.len();
    b.section(QEMU_VM_SECTION_PART, 7);
    b.page("pc.ram", 0, P, false)
        .page("", P as u64, P, true)
        .eos()
        .footer(7);
    let downtime = b.len();
    let mut discard = vec![0u8];
    discard.push(6);
    discard.extend_from_slice(b"pc.ram");
    discard.push(0);
    discard.extend_from_slice(&0u64.to_be_bytes());
    discard.extend_from_slice(&(P as u64).to_be_bytes());
    b.cmd(MIG_CMD_POSTCOPY_RAM_DISCARD, &discard);
    b.ping(2);
    let mut pkg = B::default();
    pkg.cmd(MIG_CMD_POSTCOPY_LISTEN, &[]);
    pkg.device(8, "cpu", &[0x7e, 0, 0, 0, 8, 9, 9]);
    pkg.device(9, "globalstate", &[0, 0, 0, 7]);
    pkg.ping(3).cmd(MIG_CMD_POSTCOPY_RUN, &[]);
    b.cmd(MIG_CMD_PACKAGED, &(pkg.0.len() as u32).to_be_bytes());
    b.raw(&pkg.0);
    let postcopy = b.len();
    b.ping(4);
    b.section(QEMU_VM_SECTION_PART, 7);
    b.page("pc.ram", 2 * P as u64, P, false).eos().footer(7);
    b.section(QEMU_VM_SECTION_END, 7);
    b.page("", 3 * P as u64, P, true).eos().footer(7);
    b.u8(QEMU_VM_EOF);
    (b.0, [precopy, downtime, postcopy])
}

#[test]
fn postcopy_stream_phases_and_counters() {
    let (data, [precopy, downtime, postcopy]) = postcopy_stream();
    let r = run(&data);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(
        phase_changes(&r),
        vec![
            (precopy, Phase::Precopy),
            (downtime, Phase::Downtime),
            (postcopy, Phase::Postcopy)
        ]
    );
    let s = r.stats;
    assert_eq!(s.phases.downtime, postcopy - downtime);
    assert_eq!(s.phases.postcopy, data.len() as u64 - postcopy);
    assert_eq!(s.ram.precopy_bytes, (8 + 7 + P + 8 + P + 8) as u64);
    assert_eq!(s.ram.downtime_bytes, 0);
    // PART page + its EOS, END page (its EOS not counted).
    assert_eq!(s.ram.postcopy_bytes, (8 + 7 + P + 8 + 8 + P) as u64);
    assert_eq!(s.ram.normal_pages, 4);
    assert_eq!(s.page_size, Some(4096));
}

#[test]
fn ping_2_after_advise_starts_downtime() {
    let mut b = B::default();
    b.header("pc");
    let mut advise = 4096u64.to_be_bytes().to_vec();
    advise.extend_from_slice(&4096u64.to_be_bytes());
    b.cmd(MIG_CMD_POSTCOPY_ADVISE, &advise);
    b.ram_start(2, &[("pc.ram", P as u64)]);
    b.section(QEMU_VM_SECTION_PART, 2).eos().footer(2);
    let downtime = b.len();
    b.ping(2);
    let r = run(&b.0);
    assert_eq!(phase_changes(&r).last(), Some(&(downtime, Phase::Downtime)));
    // No EOF: the stream was cut.
    assert_eq!(r.outcome, Outcome::Truncated);
}

#[test]
fn switchover_start_and_full_after_part_start_downtime() {
    for with_switchover in [false, true] {
        let mut b = B::default();
        b.header("pc-q35-10.0");
        b.ram_start(2, &[("pc.ram", P as u64)]);
        b.device(3, "early", &[]);
        b.section(QEMU_VM_SECTION_PART, 2).eos().footer(2);
        let downtime = b.len();
        if with_switchover {
            b.cmd(MIG_CMD_SWITCHOVER_START, &[]);
        }
        b.device(4, "cpu", &[1]).u8(QEMU_VM_EOF);
        let r = run(&b.0);
        assert_eq!(phase_changes(&r).last(), Some(&(downtime, Phase::Downtime)));
        assert_eq!(r.outcome, Outcome::Completed);
    }
}

#[test]
fn page_size_from_config_and_capabilities() {
    let mut b = B::default();
    b.header("virt-10.0");
    b.u8(QEMU_VM_SUBSECTION)
        .s("configuration/target-page-bits")
        .be32(1)
        .be32(14);
    b.u8(QEMU_VM_SUBSECTION)
        .s("configuration/capabilities")
        .be32(1);
    b.be32(1).s("x-ignore-shared");
    b.u8(QEMU_VM_SUBSECTION)
        .s("configuration/uuid")
        .be32(1)
        .fill(0x11, 16);
    let p = 16384;
    // With x-ignore-shared every block carries a guest-physical address.
    b.section_start(QEMU_VM_SECTION_START, 1, "ram");
    b.be64((2 * p as u64) | RAM_SAVE_FLAG_MEM_SIZE);
    b.s("mach-virt.ram").be64(2 * p as u64).be64(0x4000_0000);
    b.eos().footer(1);
    b.section(QEMU_VM_SECTION_PART, 1);
    b.page("mach-virt.ram", 0, p, false)
        .page("", p as u64, p, true)
        .eos()
        .footer(1);
    b.section(QEMU_VM_SECTION_END, 1)
        .eos()
        .footer(1)
        .u8(QEMU_VM_EOF);
    let r = run(&b.0);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.stats.page_size, Some(16384));
    assert_eq!(r.stats.ram.normal_pages, 2);
}

#[test]
fn unannounced_page_size_is_found_by_validation() {
    for p in [8192usize, 16384, 65536] {
        let mut b = B::default();
        b.header("pc-i440fx-7.2");
        b.ram_start(2, &[("pc.ram", 4 * p as u64)]);
        b.section(QEMU_VM_SECTION_PART, 2);
        // Page bodies that look like nothing valid at any smaller page size.
        b.be64(RAM_SAVE_FLAG_PAGE).s("pc.ram").fill(0xff, p);
        b.be64(p as u64 | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)
            .fill(0xff, p);
        b.zero("", 2 * p as u64, true).eos().footer(2);
        b.section(QEMU_VM_SECTION_END, 2)
            .eos()
            .footer(2)
            .u8(QEMU_VM_EOF);
        let r = run(&b.0);
        assert_eq!(r.outcome, Outcome::Completed, "P={p}");
        assert_eq!(r.stats.page_size, Some(p as u32), "P={p}");
        assert_eq!(r.stats.ram.normal_pages, 2);
        assert_eq!(r.stats.ram.zero_pages, 1);
        let pre = (8 + 7 + p) + (8 + p) + 9 + 8;
        assert_eq!(r.stats.ram.precopy_bytes, pre as u64, "P={p}");
    }
}

#[test]
fn xbzrle_and_compressed_pages() {
    let mut b = B::default();
    b.header("pc-i440fx-8.2");
    b.ram_start(2, &[("pc.ram", 4 * P as u64)]);
    b.section(QEMU_VM_SECTION_PART, 2);
    b.be64(RAM_SAVE_FLAG_XBZRLE)
        .s("pc.ram")
        .u8(ENCODING_FLAG_XBZRLE)
        .be16(5)
        .fill(1, 5);
    b.be64(P as u64 | RAM_SAVE_FLAG_COMPRESS_PAGE | RAM_SAVE_FLAG_CONTINUE);
    b.be32(10).fill(2, 10);
    b.eos().footer(2);
    b.section(QEMU_VM_SECTION_END, 2)
        .eos()
        .footer(2)
        .u8(QEMU_VM_EOF);
    let r = run(&b.0);
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.stats.ram.xbzrle_pages, 1);
    assert_eq!(r.stats.ram.compressed_pages, 1);
    assert_eq!(
        r.stats.ram.precopy_bytes,
        (8 + 7 + 3 + 5 + 8 + 4 + 10 + 8) as u64
    );
}

#[test]
fn stream_without_configuration_or_footers() {
    // send-configuration=off and send-section-footer=off: RAM still parses.
    let mut b = B::default();
    b.be32(QEMU_VM_FILE_MAGIC).be32(3);
    b.section_start(QEMU_VM_SECTION_START, 2, "ram");
    b.be64(P as u64 | RAM_SAVE_FLAG_MEM_SIZE)
        .s("pc.ram")
        .be64(P as u64)
        .eos();
    b.section(QEMU_VM_SECTION_PART, 2)
        .zero("pc.ram", 0, false)
        .eos();
    b.section(QEMU_VM_SECTION_END, 2).eos();
    let device = b.len();
    b.section_start(QEMU_VM_SECTION_FULL, 3, "cpu")
        .fill(0, 4)
        .u8(QEMU_VM_EOF);
    let r = run(&b.0);
    assert_eq!(r.stats.ram.zero_pages, 1);
    // Without footers a device section cannot be skipped: opaque from there on.
    assert_eq!(r.outcome, Outcome::Opaque(DesyncReason::NoFooters));
    assert!(r.events.contains(&(
        device + 5 + 4 + 8,
        EventKind::Desync(DesyncReason::NoFooters)
    )));
    assert_eq!(r.stats.opaque_bytes, 5);
    // Downtime began at the END section (13 bytes without a footer).
    assert_eq!(r.stats.phases.downtime, b.len() - (device - 13));
}

#[test]
fn colo_goes_opaque() {
    let mut b = B::default();
    b.header("pc").cmd(MIG_CMD_ENABLE_COLO, &[]).fill(0x33, 100);
    let r = run(&b.0);
    assert_eq!(r.outcome, Outcome::Opaque(DesyncReason::Colo));
    assert_eq!(r.stats.opaque_bytes, 100);
}

#[test]
fn bad_ram_flags_go_opaque_in_the_current_phase() {
    let mut b = B::default();
    b.header("pc");
    b.ram_start(2, &[("pc.ram", P as u64)]);
    b.section(QEMU_VM_SECTION_PART, 2).zero("pc.ram", 0, false);
    let bad = b.len();
    b.be64(RAM_SAVE_FLAG_HOOK).fill(0, 1000);
    let r = run(&b.0);
    assert_eq!(
        r.outcome,
        Outcome::Opaque(DesyncReason::BadRamFlags(RAM_SAVE_FLAG_HOOK))
    );
    assert!(
        r.events
            .contains(&(bad, EventKind::Desync(DesyncReason::BadRamFlags(0x80))))
    );
    assert_eq!(r.stats.opaque_bytes, b.len() - bad);
    assert_eq!(r.stats.phases.precopy, b.len() - (bad - 5 - 16));
}

#[test]
fn truncated_streams_are_reported() {
    let (data, _) = precopy_stream();
    for cut in [
        1,
        3,
        7,
        8,
        20,
        100,
        200,
        data.len() / 2,
        data.len() - 20,
        data.len() - 1,
    ] {
        let r = run(&data[..cut]);
        assert!(
            matches!(
                r.outcome,
                Outcome::Truncated | Outcome::Opaque(DesyncReason::UnknownChannel)
            ),
            "cut at {cut}: {:?}",
            r.outcome
        );
    }
    // Cut right after EOF (no VMDESCRIPTION): a complete precopy stream.
    let eof = data.len() - 12;
    assert_eq!(data[eof - 1], QEMU_VM_EOF);
    assert_eq!(run(&data[..eof]).outcome, Outcome::Completed);
}

#[test]
fn data_after_the_end_is_opaque() {
    let (mut data, _) = precopy_stream();
    data.extend_from_slice(&[1, 2, 3]);
    let r = run(&data);
    assert_eq!(r.outcome, Outcome::Opaque(DesyncReason::AfterEnd));
    assert_eq!(r.stats.opaque_bytes, 3);
}

#[test]
fn empty_tls_and_unknown_channels() {
    let t = now();
    let mut p = StreamParser::new();
    p.finish(t);
    assert_eq!(p.outcome(), Outcome::Empty);
    assert_eq!(p.stats().total_bytes, 0);

    let mut tls = B::default();
    tls.raw(&[0x16, 0x03, 0x01, 0x02, 0x00, 0x01])
        .fill(0x77, 500);
    let r = run(&tls.0);
    assert_eq!(r.kind, Some(ChannelKind::Tls));
    assert_eq!(r.outcome, Outcome::Opaque(DesyncReason::Tls));
    assert_eq!(r.stats.opaque_bytes, 506);

    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[0x51, 0x45, 0x56, 0x00, 9],
        &[0x08, 0x00, 0x02, 0, 0],
    ] {
        let r = run(garbage);
        assert_eq!(r.kind, Some(ChannelKind::Unknown));
        assert_eq!(r.stats.opaque_bytes, garbage.len() as u64);
        assert_eq!(r.stats.phases.setup, garbage.len() as u64);
    }
    // Too short to classify.
    let r = run(&[0x11, 0x22]);
    assert_eq!(r.kind, Some(ChannelKind::Unknown));
}

#[test]
fn multifd_channel_packets_and_bytes() {
    let count = 128usize;
    let header = 320 + 8 * count;
    let packet = |b: &mut B, flags: u32, normal: u32, next: u32, num: u64, offsets: &[u64]| {
        b.be32(MULTIFD_MAGIC)
            .be32(1)
            .be32(flags)
            .be32(count as u32)
            .be32(normal)
            .be32(next);
        b.be64(num).be32(0).fill(0, 28);
        let mut name = [0u8; 256];
        name[..6].copy_from_slice(b"pc.ram");
        b.raw(&name);
        for o in offsets {
            b.be64(*o);
        }
        b.fill(0, 8 * (count - offsets.len()));
    };
    let mut b = B::default();
    b.be32(MULTIFD_MAGIC)
        .be32(1)
        .fill(0x42, 16)
        .u8(0)
        .fill(0, 39);
    packet(&mut b, MULTIFD_FLAG_SYNC, 0, 0, 0, &[]);
    packet(&mut b, 0, 3, 3 * P as u32, 1, &[0, 4096, 8192]);
    b.fill(0xcc, 3 * P);
    // 7.2: a SYNC packet without pages keeps a stale next_packet_size; no payload follows.
    packet(&mut b, MULTIFD_FLAG_SYNC, 0, 3 * P as u32, 2, &[]);
    // zlib: payload is next_packet_size.
    packet(&mut b, 0x02, 1, 100, 3, &[8192]);
    b.fill(0xdd, 100);
    let r = run(&b.0);
    assert_eq!(r.kind, Some(ChannelKind::Multifd));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.stats.ram.multifd_packets, 4);
    assert_eq!(r.stats.ram.multifd_bytes, (4 * header + 3 * P + 100) as u64);
    assert_eq!(r.stats.ram.normal_pages, 4);
    // The initial packet and the empty SYNC packet are setup; the first packet with pages
    // starts pre-copy (QEMU counts those pages as pre-copy even when they precede the main
    // channel's first RAM section), and says so with a PhaseChanged event at its offset.
    let first_pages = (64 + header) as u64;
    assert_eq!(r.stats.phases.setup, first_pages);
    assert_eq!(r.stats.phases.precopy, b.len() - first_pages);
    assert!(r.events.iter().any(|e| e.0 == first_pages
        && e.1
            == EventKind::PhaseChanged {
                from: Phase::Setup,
                to: Phase::Precopy
            }));
    let packets: Vec<MultifdPacket> = r
        .events
        .iter()
        .filter_map(|e| match e.1 {
            EventKind::MultifdPacket(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(packets.len(), 2);
    assert_eq!((packets[0].first_offset, packets[0].last_offset), (0, 8192));
    // Packet 3 starts with packet 1's last page: a repeat, even with the empty SYNC packet
    // 2 between them (7.2 renumbers queued packets at a sync round).
    let mut ledger = MultifdLedger::new();
    for p in &packets {
        ledger.record(p);
    }
    assert_eq!(ledger.repeated_pages(), 1);
    // In either order of arrival; a packet's last page is repeated at most once.
    let (one, three) = (packets[0], packets[1]);
    let mut ledger = MultifdLedger::new();
    ledger.record(&three);
    ledger.record(&one);
    // Another packet (one page, 8192 again) between them finds 1's tail and 3's head taken.
    let mut again = three;
    again.packet_num = 2;
    ledger.record(&again);
    assert_eq!(ledger.repeated_pages(), 1, "1's last page is repeated once");
    // Beyond the reach, or in another block, it is a page sent again, not a repeat.
    let mut ledger = MultifdLedger::new();
    ledger.record(&one);
    let mut far = three;
    far.packet_num = 1 + 5;
    ledger.record(&far);
    let mut other = three;
    other.packet_num = 2;
    other.block ^= 1;
    ledger.record(&other);
    assert_eq!(ledger.repeated_pages(), 0);

    // The sequence of a 2-channel 7.2 capture on VM-C around a sync round: 515 on channel
    // A, then the sync renumbers what was still queued: 519 on A (its first page is 515's
    // last) and 518 on B (later pages); 516 and 517 never appear. QEMU counted one page less
    // than the packets carry.
    let pk = |num, first, last| MultifdPacket {
        packet_num: num,
        block: 7,
        normal_pages: 2,
        first_offset: first,
        last_offset: last,
    };
    let seq = [
        pk(515, 0x888_0000, 0x888_8000),
        pk(519, 0x888_8000, 0x890_0000),
        pk(518, 0x890_4000, 0x890_5000),
        pk(520, 0x890_6000, 0x891_0000),
    ];
    for order in [[0, 1, 2, 3], [2, 3, 1, 0], [1, 0, 3, 2]] {
        let mut ledger = MultifdLedger::new();
        for i in order {
            ledger.record(&seq[i]);
        }
        assert_eq!(ledger.repeated_pages(), 1, "order {order:?}");
    }

    // The owner decides the phase of multifd bytes.
    let t = now();
    let mut p = StreamParser::new();
    p.feed(&b.0[..100], t);
    p.follow_phase(Phase::Downtime, t + Duration::from_millis(5));
    p.feed(&b.0[100..], t);
    p.finish(t);
    assert_eq!(p.stats().phases.setup, 100);
    assert_eq!(p.stats().phases.downtime, b.len() - 100);
    // Truncated mid-packet.
    let r = run(&b.0[..b.0.len() - 1]);
    assert_eq!(r.outcome, Outcome::Truncated);
    // A corrupted magic goes opaque.
    let mut bad = b.0.clone();
    bad[64] = 0;
    let r = run(&bad);
    assert_eq!(r.outcome, Outcome::Opaque(DesyncReason::BadMultifdPacket));
    assert_eq!(r.stats.opaque_bytes, bad.len() as u64 - 64);
}

#[test]
fn preempt_and_recovery_channels() {
    let mut b = B::default();
    b.page("pc.ram", 0x1000, P, false)
        .zero("", 0x3000, true)
        .eos();
    let r = run(&b.0);
    assert_eq!(r.kind, Some(ChannelKind::Preempt));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.stats.phases.postcopy, b.len());
    assert_eq!(r.stats.ram.postcopy_bytes, (8 + 7 + P + 9) as u64);

    let mut b = B::default();
    b.cmd(MIG_CMD_RECV_BITMAP, b"\x06pc.ram")
        .cmd(MIG_CMD_POSTCOPY_RESUME, &[]);
    b.section(QEMU_VM_SECTION_PART, 2)
        .page("pc.ram", 0, P, false)
        .eos()
        .footer(2);
    b.section(QEMU_VM_SECTION_END, 2)
        .eos()
        .footer(2)
        .u8(QEMU_VM_EOF);
    let r = run(&b.0);
    assert_eq!(r.kind, Some(ChannelKind::Recovery));
    assert_eq!(r.outcome, Outcome::Completed);
    assert_eq!(r.stats.phases.postcopy, b.len());
    assert_eq!(r.stats.ram.postcopy_bytes, (8 + 7 + P + 8) as u64);
}

fn rp_run(data: &[u8]) -> (Stats, Outcome, Vec<EventKind>) {
    let t = now();
    let mut whole = ReturnPathParser::new();
    whole.feed(data, t);
    whole.finish(t);
    let mut bytes = ReturnPathParser::new();
    for c in data.chunks(1) {
        bytes.feed(c, t);
    }
    bytes.finish(t);
    assert_eq!(whole.stats(), bytes.stats());
    assert_eq!(whole.outcome(), bytes.outcome());
    let s = *whole.stats();
    assert_eq!(s.phases.return_path, data.len() as u64);
    let mut ev = Vec::new();
    while let Some(e) = whole.poll_event() {
        ev.push(e.kind);
    }
    (s, whole.outcome(), ev)
}

#[test]
fn return_path_messages() {
    let mut b = B::default();
    b.be16(MIG_RP_MSG_PONG).be16(4).be32(1);
    b.be16(MIG_RP_MSG_REQ_PAGES_ID)
        .be16(19)
        .be64(0x1000)
        .be32(4096)
        .s("pc.ram");
    b.be16(MIG_RP_MSG_REQ_PAGES)
        .be16(12)
        .be64(0x5000)
        .be32(4096);
    b.be16(MIG_RP_MSG_RECV_BITMAP).be16(7).s("pc.ram");
    b.be64(16).fill(0xff, 16).be64(RAMBLOCK_RECV_BITMAP_ENDING);
    b.be16(MIG_RP_MSG_RESUME_ACK).be16(4).be32(1);
    b.be16(MIG_RP_MSG_SWITCHOVER_ACK).be16(0);
    let body = b.clone();
    b.be16(MIG_RP_MSG_SHUT).be16(4).be32(0);
    let (s, outcome, ev) = rp_run(&b.0);
    assert_eq!(outcome, Outcome::Completed);
    assert_eq!(s.ram.page_requests, 2);
    assert_eq!(
        ev,
        vec![
            EventKind::Pong(1),
            EventKind::PageRequest { len: 4096 },
            EventKind::PageRequest { len: 4096 },
            EventKind::Shut(0)
        ]
    );
    // Failure code, truncation, garbage.
    let mut failed = body.clone();
    failed.be16(MIG_RP_MSG_SHUT).be16(4).be32(5);
    assert_eq!(rp_run(&failed.0).1, Outcome::Failed { code: 5 });
    assert_eq!(rp_run(&body.0).1, Outcome::Truncated);
    assert_eq!(rp_run(&b.0[..b.0.len() - 2]).1, Outcome::Truncated);
    let (s, outcome, _) = rp_run(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
    assert_eq!(
        outcome,
        Outcome::Opaque(DesyncReason::BadRpMessage {
            kind: 0xdead,
            len: 0xbeef
        })
    );
    assert_eq!(s.opaque_bytes, 7);
    let mut bad_mark = body.clone();
    bad_mark.0.truncate(bad_mark.0.len() - 12 - 4);
    assert!(matches!(
        rp_run(&bad_mark.0).1,
        Outcome::Truncated | Outcome::Opaque(_)
    ));
    assert_eq!(rp_run(&[]).1, Outcome::Empty);
}

#[test]
fn packaged_blob_is_skipped_by_count_even_when_unparseable() {
    let mut b = B::default();
    b.header("pc");
    b.ram_start(2, &[("pc.ram", P as u64)]);
    b.section(QEMU_VM_SECTION_PART, 2).eos().footer(2);
    let downtime = b.len();
    b.cmd(MIG_CMD_PACKAGED, &1000u32.to_be_bytes())
        .fill(0xee, 1000);
    let postcopy = b.len();
    b.ping(4)
        .section(QEMU_VM_SECTION_END, 2)
        .eos()
        .footer(2)
        .u8(QEMU_VM_EOF);
    let r = run(&b.0);
    assert_eq!(
        phase_changes(&r)[1..],
        [(downtime, Phase::Downtime), (postcopy, Phase::Postcopy)]
    );
    // The blob's garbage made the nested parse give up; the phase still switched at the end.
    assert_eq!(
        r.outcome,
        Outcome::Opaque(DesyncReason::UnexpectedRecord(0xee))
    );
    assert_eq!(r.stats.phases.downtime, postcopy - downtime);
}

#[test]
fn pending_header_bytes_wait_for_their_phase() {
    let mut b = B::default();
    b.header("pc");
    b.ram_start(2, &[("pc.ram", P as u64)]);
    b.section(QEMU_VM_SECTION_PART, 2).eos().footer(2);
    let cmd = b.len();
    b.cmd(MIG_CMD_SWITCHOVER_START, &[]);
    let t = now();
    let mut p = StreamParser::new();
    p.feed(&b.0[..cmd as usize + 3], t);
    assert_eq!(p.stats().unattributed_bytes, 3);
    assert_eq!(p.stats().phases.downtime, 0);
    p.feed(&b.0[cmd as usize + 3..], t);
    assert_eq!(p.stats().phases.downtime, 5);
    assert_eq!(p.stats().unattributed_bytes, 0);
}

#[test]
fn event_queue_is_bounded() {
    let mut b = B::default();
    for _ in 0..(MAX_QUEUED_EVENTS + 10) {
        b.be16(MIG_RP_MSG_REQ_PAGES).be16(12).be64(0).be32(4096);
    }
    let t = now();
    let mut p = ReturnPathParser::new();
    p.feed(&b.0, t);
    assert_eq!(p.stats().dropped_events, 10);
    assert_eq!(p.stats().ram.page_requests, (MAX_QUEUED_EVENTS + 10) as u64);
    let mut n = 0;
    while p.poll_event().is_some() {
        n += 1;
    }
    assert_eq!(n, MAX_QUEUED_EVENTS);
}

/// Random mutations of valid streams, fed in random splits: never a panic, always every
/// byte attributed, and always the same result whatever the split.
#[test]
fn mutated_streams_never_break_the_invariants() {
    let (pre, _) = precopy_stream();
    let (post, _) = postcopy_stream();
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for round in 0..300 {
        let mut data = if round % 2 == 0 {
            pre.clone()
        } else {
            post.clone()
        };
        // Skip the 40 page-body heavy bytes rarely; mutate 1-4 bytes anywhere.
        for _ in 0..1 + rnd() % 4 {
            let at = (rnd() % data.len() as u64) as usize;
            data[at] = rnd() as u8;
        }
        if round % 7 == 0 {
            data.truncate((rnd() % data.len() as u64) as usize);
        }
        let whole = run_chunks(&data, []);
        let mut chunks = Vec::new();
        let mut left = data.len();
        while left > 0 {
            let n = (1 + rnd() % 97) as usize;
            chunks.push(n.min(left));
            left -= n.min(left);
        }
        let split = run_chunks(&data, chunks);
        assert_eq!(split.stats, whole.stats, "round {round}");
        assert_eq!(split.outcome, whole.outcome, "round {round}");
        assert_eq!(split.events, whole.events, "round {round}");
    }
    // Pure noise, every first byte.
    for first in 0..=255u8 {
        let mut data = vec![first];
        for _ in 0..2000 {
            data.push(rnd() as u8);
        }
        let r = run_chunks(&data, [1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144]);
        assert_eq!(r.stats.total_bytes, 2001);
    }
}

/// Two inputs from cargo-fuzz (fuzz/fuzz_targets/main_stream.rs) at the edges of the
/// contract: a bad record right after the in-place fast path must be reported at its own
/// offset however the input is split (the fast path keeps the header start current), and a
/// 512-byte command must not hold more than [`MAX_HEADER_BYTES`] unattributed.
#[test]
fn fuzz_regressions_split_invariant_and_bounded() {
    for data in [
        &include_bytes!("testdata/fuzz-desync-after-fast-path.bin")[..],
        &include_bytes!("testdata/fuzz-long-command.bin")[..],
    ] {
        let whole = run(data);
        assert!(
            matches!(whole.outcome, Outcome::Opaque(_)),
            "{:?}",
            whole.outcome
        );
        // Fed byte by byte, nothing is ever held beyond MAX_HEADER_BYTES.
        let mut p = StreamParser::new();
        for b in data {
            p.feed(std::slice::from_ref(b), now());
            assert!(p.stats().unattributed_bytes <= crate::qemu::MAX_HEADER_BYTES as u64);
        }
    }
}
