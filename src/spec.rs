//! Parsing of the small value languages users type: link rates, burst sizes, framing and
//! durations.
//!
//! Everything here is pure: strings in, typed values or a [`SpecError`] that repeats the
//! offending value and lists the valid forms. Unit arithmetic is delegated to `byte-unit`
//! (decimal-exact) and `humantime`; this module only fixes the grammar (what a bare `1g`
//! means, that `B/s` is bytes and `bit` is bits, case-insensitively).

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A value the user wrote could not be understood.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// A link rate such as `1g` was malformed.
    #[error(
        "invalid link spec {0:?}: expected a rate such as 1g, 10g, 2.5gbit, 100mbit, \
         1000000000bit, 125MB/s, 1.25GB/s, or `unlimited` (decimal SI units; a bare prefix or \
         `bit` means bits per second, `B/s` bytes per second; case-insensitive)"
    )]
    Link(String),
    /// A burst such as `4ms` was malformed or out of range.
    #[error(
        "invalid burst {0:?}: expected a duration of line rate (e.g. 1ms (the default), 500us; at most 1s) \
         or a size in bytes (e.g. 500KB, 1MiB, 65536)"
    )]
    Burst(String),
    /// A duration such as `250us` was malformed.
    #[error("invalid duration {0:?}: expected e.g. 0, 250us, 5ms, 2s, 1m")]
    Duration(String),
    /// A one-way delay was malformed or longer than [`MAX_DELAY`].
    #[error(
        "invalid delay {0:?}: expected a one-way delay such as 0, 250us, 5ms, 100ms, at most 10s \
         (each connection direction holds at most 32 MiB in flight, so longer delays would \
         only cap throughput: 32 MiB per 10 s is 27 Mb/s)"
    )]
    Delay(String),
    /// A framing such as `ethernet:1500` was malformed.
    #[error(
        "invalid framing {0:?}: expected `none`, `ethernet` (MTU 1500) or `ethernet:MTU` \
         with 576 <= MTU <= 65535"
    )]
    Framing(String),
}

// === impl LinkRate ===

/// The emulated link's line rate, in bits per second, or no limit at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LinkRate {
    /// Forward as fast as the sockets allow.
    Unlimited,
    /// Line rate in bits per second (never zero).
    BitsPerSecond(NonZeroU64),
}

impl LinkRate {
    /// Line rate in bytes per second, `None` when unlimited.
    pub fn bytes_per_second(self) -> Option<f64> {
        match self {
            LinkRate::Unlimited => None,
            LinkRate::BitsPerSecond(b) => Some(b.get() as f64 / 8.0),
        }
    }
}

impl FromStr for LinkRate {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = || SpecError::Link(s.to_string());
        let t = s.trim().to_ascii_lowercase();
        if t == "unlimited" || t == "none" || t == "inf" {
            return Ok(LinkRate::Unlimited);
        }
        // `bps` is bits per second (as in `1gbps`); `/s` just marks a rate.
        let t = match t.strip_suffix("bps") {
            Some(head) => format!("{head}bit"),
            None => t.strip_suffix("/s").unwrap_or(&t).to_string(),
        };
        let t = t.as_str();
        let num_end = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        if num_end == 0 {
            return Err(err());
        }
        let unit = &t[num_end..];
        // Which units are bytes: anything ending in `b` that is not `bit`.
        let bytes_unit = unit.ends_with('b') && !unit.ends_with("bit");
        let bits: u128 = if bytes_unit {
            let b = byte_unit::Byte::parse_str(t, true).map_err(|_| err())?;
            b.as_u128().checked_mul(8).ok_or_else(err)?
        } else {
            if !matches!(
                unit,
                "" | "k" | "m" | "g" | "t" | "kbit" | "mbit" | "gbit" | "tbit" | "bit"
            ) {
                return Err(err());
            }
            byte_unit::Bit::parse_str(t).map_err(|_| err())?.as_u128()
        };
        let bits = u64::try_from(bits).map_err(|_| err())?;
        // A rate below one byte per second is not a link, it is a typo.
        if bits < 8 {
            return Err(err());
        }
        Ok(LinkRate::BitsPerSecond(
            NonZeroU64::new(bits).ok_or_else(err)?,
        ))
    }
}

impl fmt::Display for LinkRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkRate::Unlimited => f.write_str("unlimited"),
            LinkRate::BitsPerSecond(b) => f.write_str(&format_bits(b.get() as f64)),
        }
    }
}

/// Formats bits per second with a decimal SI prefix, e.g. `1gbit`, `2.5gbit`, `941.2mbit`.
pub fn format_bits(bits_per_s: f64) -> String {
    let (v, p) = if bits_per_s >= 1e12 {
        (bits_per_s / 1e12, "t")
    } else if bits_per_s >= 1e9 {
        (bits_per_s / 1e9, "g")
    } else if bits_per_s >= 1e6 {
        (bits_per_s / 1e6, "m")
    } else if bits_per_s >= 1e3 {
        (bits_per_s / 1e3, "k")
    } else {
        (bits_per_s, "")
    };
    let s = format!("{v:.4}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    format!("{s}{p}bit")
}

// === impl Burst ===

/// How far the emulated link may run ahead of its line rate: a duration of line rate
/// (scales with the rate on a link change) or a fixed number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Burst {
    /// This much time at line rate.
    Time(Duration),
    /// A fixed size in bytes.
    Bytes(NonZeroU64),
}

impl Burst {
    /// The default: 1 ms of line rate. Measured with `cargo bench --bench link`
    /// (`docs/benchmarks.md`): with the sub-millisecond pacer and the zero-copy path, 1 ms
    /// keeps the mean within 0.1 % at 1 and 10 Gb/s, also with a busy loop on the other of
    /// 2 cores, and every extra millisecond of burst is an extra 1 % peak in a 100 ms window
    /// (10 Gb/s, 4 streams: 2 ms peaked at 1.022, 1 ms at 1.016).
    pub const DEFAULT: Burst = Burst::Time(Duration::from_millis(1));

    /// The burst in bytes at the given line rate (`None` when unlimited).
    pub fn bytes_at(self, rate: LinkRate) -> Option<u64> {
        let bps = rate.bytes_per_second()?;
        Some(match self {
            Burst::Bytes(b) => b.get(),
            Burst::Time(d) => ((bps * d.as_secs_f64()).round() as u64).max(1),
        })
    }
}

impl FromStr for Burst {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = || SpecError::Burst(s.to_string());
        let t = s.trim();
        let lower = t.to_ascii_lowercase();
        let is_size = lower.ends_with('b') || lower.chars().all(|c| c.is_ascii_digit());
        if is_size {
            let b = byte_unit::Byte::parse_str(t, true).map_err(|_| err())?;
            let b = NonZeroU64::new(b.as_u64()).ok_or_else(err)?;
            Ok(Burst::Bytes(b))
        } else {
            let d = humantime::parse_duration(t).map_err(|_| err())?;
            if d.is_zero() || d > Duration::from_secs(1) {
                return Err(err());
            }
            Ok(Burst::Time(d))
        }
    }
}

impl fmt::Display for Burst {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Burst::Time(d) => write!(f, "{}", humantime::format_duration(*d)),
            Burst::Bytes(b) => write!(f, "{b}B"),
        }
    }
}

// === impl Framing ===

/// Per-segment overhead charged on top of each payload byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// Charge payload bytes only: the link carries exactly its line rate of payload.
    None,
    /// TCP/IPv4 over Ethernet with this MTU (IP packet size).
    Ethernet {
        /// IP MTU, 576..=65535.
        mtu: u32,
    },
}

/// Ethernet header (14) + FCS (4) + preamble/SFD (8) + inter-frame gap (12).
const ETHERNET_WIRE_OVERHEAD: u32 = 14 + 4 + 8 + 12;
/// IPv4 header (20) + TCP header (20) + TCP timestamp option (12).
const TCP_IP_HEADERS: u32 = 20 + 20 + 12;

impl Framing {
    /// The default: a real Ethernet link with the standard 1500-byte MTU, so `1g` carries
    /// about 941 Mb/s of payload like a GbE NIC does.
    pub const DEFAULT: Framing = Framing::Ethernet { mtu: 1500 };

    /// Wire bytes per payload byte as an exact ratio `(wire, payload)`, e.g. 1538/1448.
    pub fn wire_ratio(self) -> (u64, u64) {
        match self {
            Framing::None => (1, 1),
            Framing::Ethernet { mtu } => (
                u64::from(mtu + ETHERNET_WIRE_OVERHEAD),
                u64::from(mtu - TCP_IP_HEADERS),
            ),
        }
    }

    /// Payload bits per second a link of `rate` carries with this framing.
    pub fn payload_rate(self, rate: LinkRate) -> Option<f64> {
        let (wire, payload) = self.wire_ratio();
        rate.bytes_per_second()
            .map(|b| b * 8.0 * payload as f64 / wire as f64)
    }
}

impl FromStr for Framing {
    type Err = SpecError;

    fn from_str(s: &str) -> Result<Self, SpecError> {
        let err = || SpecError::Framing(s.to_string());
        let t = s.trim().to_ascii_lowercase();
        match t.as_str() {
            "none" => return Ok(Framing::None),
            "ethernet" => return Ok(Framing::DEFAULT),
            _ => {}
        }
        let mtu = t.strip_prefix("ethernet:").ok_or_else(err)?;
        let mtu: u32 = mtu.parse().map_err(|_| err())?;
        if !(576..=65535).contains(&mtu) {
            return Err(err());
        }
        Ok(Framing::Ethernet { mtu })
    }
}

impl fmt::Display for Framing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Framing::None => f.write_str("none"),
            Framing::Ethernet { mtu } => write!(f, "ethernet:{mtu}"),
        }
    }
}

// === durations ===

/// Parses a duration such as `0`, `250us`, `5ms`, `2s`, `1m`.
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let t = s.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    humantime::parse_duration(t).map_err(|_| SpecError::Duration(s.to_string()))
}

/// A [`Duration`] that deserializes from the strings [`parse_duration`] accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HumanDuration(pub Duration);

impl FromStr for HumanDuration {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_zero() {
            f.write_str("0")
        } else {
            write!(f, "{}", humantime::format_duration(self.0))
        }
    }
}

/// The longest one-way delay a link accepts.
pub const MAX_DELAY: Duration = Duration::from_secs(10);

/// A link's one-way propagation delay: a duration of at most [`MAX_DELAY`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Delay(pub Duration);

impl FromStr for Delay {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match parse_duration(s) {
            Ok(d) if d <= MAX_DELAY => Ok(Delay(d)),
            _ => Err(SpecError::Delay(s.to_string())),
        }
    }
}

impl fmt::Display for Delay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        HumanDuration(self.0).fmt(f)
    }
}

/// Deserializes any `FromStr` type from a string, keeping its error message.
fn de_from_str<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse().map_err(serde::de::Error::custom)
}

macro_rules! deserialize_via_from_str {
    ($($t:ty),*) => {$(
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                de_from_str(d)
            }
        }
    )*};
}
deserialize_via_from_str!(LinkRate, Burst, Framing, HumanDuration, Delay);

#[cfg(test)]
mod tests {
    use super::*;

    fn bits(s: &str) -> u64 {
        match s.parse::<LinkRate>().unwrap() {
            LinkRate::BitsPerSecond(b) => b.get(),
            LinkRate::Unlimited => panic!("{s} parsed as unlimited"),
        }
    }

    #[test]
    fn delays_above_ten_seconds_are_refused() {
        assert_eq!("0".parse::<Delay>().unwrap(), Delay(Duration::ZERO));
        assert_eq!("10s".parse::<Delay>().unwrap(), Delay(MAX_DELAY));
        for bad in ["100000000s", "10001ms", "11s", "1h", "soon"] {
            let e = bad.parse::<Delay>().unwrap_err().to_string();
            assert!(e.contains("at most 10s") && e.contains(bad), "{bad}: {e}");
        }
    }

    #[test]
    fn link_specs_from_the_issue() {
        assert_eq!(bits("1g"), 1_000_000_000);
        assert_eq!(bits("10g"), 10_000_000_000);
        assert_eq!(bits("10G"), 10_000_000_000);
        assert_eq!(bits("2.5gbit"), 2_500_000_000);
        assert_eq!(bits("100mbit"), 100_000_000);
        assert_eq!(bits("100Mbit"), 100_000_000);
        assert_eq!(bits("1000000000bit"), 1_000_000_000);
        assert_eq!(bits("125MB/s"), 1_000_000_000);
        assert_eq!(bits("125mb/s"), 1_000_000_000);
        assert_eq!(bits("1.25GB/s"), 10_000_000_000);
        assert_eq!(bits("1gbps"), 1_000_000_000);
        assert_eq!(
            "unlimited".parse::<LinkRate>().unwrap(),
            LinkRate::Unlimited
        );
        assert_eq!(
            "UNLIMITED".parse::<LinkRate>().unwrap(),
            LinkRate::Unlimited
        );
    }

    #[test]
    fn malformed_link_specs_list_valid_forms() {
        for bad in [
            "", "g", "1q", "fast", "-1g", "1xb/s", "0", "0g", "1 g x", "1e9",
        ] {
            let e = bad.parse::<LinkRate>().unwrap_err().to_string();
            assert!(
                e.contains("2.5gbit") && e.contains("unlimited"),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn link_rate_display_round_trips() {
        for s in ["1g", "10g", "2.5gbit", "100mbit", "125MB/s", "unlimited"] {
            let r: LinkRate = s.parse().unwrap();
            assert_eq!(r.to_string().parse::<LinkRate>().unwrap(), r, "{s}");
        }
    }

    #[test]
    fn bursts() {
        assert_eq!(
            "4ms".parse::<Burst>().unwrap(),
            Burst::Time(Duration::from_millis(4))
        );
        assert_eq!(
            "500KB".parse::<Burst>().unwrap(),
            Burst::Bytes(NonZeroU64::new(500_000).unwrap())
        );
        assert_eq!(
            "65536".parse::<Burst>().unwrap(),
            Burst::Bytes(NonZeroU64::new(65536).unwrap())
        );
        let g1: LinkRate = "1g".parse().unwrap();
        assert_eq!(Burst::DEFAULT.bytes_at(g1), Some(125_000));
        assert_eq!(Burst::DEFAULT.bytes_at(LinkRate::Unlimited), None);
        for bad in ["0ms", "2s", "x", "0", "-1ms"] {
            assert!(bad.parse::<Burst>().is_err(), "{bad}");
        }
    }

    #[test]
    fn framing_payload_rates_match_real_ethernet() {
        let g1: LinkRate = "1g".parse().unwrap();
        let e1500: Framing = "ethernet:1500".parse().unwrap();
        let e9000: Framing = "ethernet:9000".parse().unwrap();
        let p1500 = e1500.payload_rate(g1).unwrap() / 1e6;
        let p9000 = e9000.payload_rate(g1).unwrap() / 1e6;
        assert!((941.0..942.0).contains(&p1500), "{p1500}");
        assert!((990.0..991.0).contains(&p9000), "{p9000}");
        assert_eq!("ethernet".parse::<Framing>().unwrap(), e1500);
        assert_eq!("none".parse::<Framing>().unwrap(), Framing::None);
        for bad in ["ethernet:100", "ethernet:x", "wifi", "ethernet:70000"] {
            assert!(bad.parse::<Framing>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("5ms").unwrap(), Duration::from_millis(5));
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("1m").unwrap(), Duration::from_secs(60));
        assert!(parse_duration("5 parsecs").is_err());
    }
}
