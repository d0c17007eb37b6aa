//! Kernel pacing of a forwarded socket (`SO_MAX_PACING_RATE`).
//!
//! The link's bucket decides how many bytes may leave and when; the kernel's TCP pacing
//! (earliest-departure-time, or the `fq` qdisc where one is installed) spreads them on the
//! wire at the link's rate. A user-space holder that wakes late then costs nothing as long
//! as the kernel still holds bytes released before, which is what lets the link keep its
//! mean on hosts whose timers fire late (see `link::PACED_LEAD`).

use std::io;
use tokio::net::TcpStream;

use crate::link::PACED_LEAD;

use nix::{getsockopt_impl, setsockopt_impl, sockopt_impl};

sockopt_impl!(
    /// `SO_MAX_PACING_RATE`: the most bytes per second the kernel sends on a socket. Set
    /// as a 32-bit value (every kernel takes it); `u32::MAX` means unlimited.
    MaxPacingRate,
    Both,
    libc::SOL_SOCKET,
    libc::SO_MAX_PACING_RATE,
    usize
);

/// Largest rate the 32-bit option carries (about 34 Gb/s); anything above is unlimited.
const UNLIMITED: u64 = u32::MAX as u64;

/// Paces `s` at `rate` payload bytes per second, or lifts its pacing (`None`). A paced
/// socket also takes no more unsent bytes than [`PACED_LEAD`] of its rate
/// (`TCP_NOTSENT_LOWAT`): writes beyond wait, so what the kernel holds, and the latency it
/// adds, stays bounded by the lead even where the kernel paces a little slower than asked.
pub fn set(s: &TcpStream, rate: Option<u64>) -> io::Result<()> {
    let v = rate.map_or(UNLIMITED, |r| r.clamp(1, UNLIMITED));
    nix::sys::socket::setsockopt(s, MaxPacingRate, &(v as usize)).map_err(io::Error::from)?;
    // 0 restores the system default (no limit unless net.ipv4.tcp_notsent_lowat says so).
    let lowat = rate.map_or(0, |r| {
        let lead = (r as f64 * PACED_LEAD.as_secs_f64()) as u64;
        u32::try_from(lead.max(MIN_LOWAT)).unwrap_or(u32::MAX)
    });
    socket2::SockRef::from(s).set_tcp_notsent_lowat(lowat)
}

/// Smallest unsent-bytes limit: one loopback segment, so slow links still write whole
/// chunks.
const MIN_LOWAT: u64 = 64 * 1024;

/// The pacing rate of `s` (`None`: unlimited).
pub fn get(s: &TcpStream) -> io::Result<Option<u64>> {
    let v = nix::sys::socket::getsockopt(s, MaxPacingRate).map_err(io::Error::from)? as u64;
    Ok((v < UNLIMITED).then_some(v))
}
