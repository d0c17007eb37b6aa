//! The value languages of `migshaper::spec`: every line of the input is parsed as a link
//! rate, a burst, a framing and a duration. Besides "no panic" (overflow checks are on:
//! `scripts/fuzz` builds with debug assertions):
//! * a framing, burst or duration prints back to a string that parses to the same value;
//! * a link rate prints back to a string that parses (its display is rounded to 4
//!   decimals, so not necessarily to the same value);
//! * the first rate, burst and framing found are combined (`Burst::bytes_at`,
//!   `Framing::payload_rate`, `LinkRate::bytes_per_second`), as the link does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migshaper::spec::{Burst, Framing, LinkRate, parse_duration};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let mut rate = None;
    let mut burst = None;
    let mut framing = None;
    for line in text.split('\n') {
        match line.parse::<LinkRate>() {
            Ok(r) => {
                let shown = r.to_string();
                assert!(
                    shown.parse::<LinkRate>().is_ok(),
                    "LinkRate {line:?} -> {r:?} displays as {shown:?}, which does not parse"
                );
                rate.get_or_insert(r);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        match line.parse::<Burst>() {
            Ok(b) => {
                let shown = b.to_string();
                assert_eq!(
                    shown.parse::<Burst>(),
                    Ok(b),
                    "Burst {line:?} displays as {shown:?}"
                );
                burst.get_or_insert(b);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        match line.parse::<Framing>() {
            Ok(f) => {
                let shown = f.to_string();
                assert_eq!(
                    shown.parse::<Framing>(),
                    Ok(f),
                    "Framing {line:?} displays as {shown:?}"
                );
                framing.get_or_insert(f);
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
        match parse_duration(line) {
            Ok(d) => {
                let shown = migshaper::spec::HumanDuration(d).to_string();
                assert_eq!(
                    parse_duration(&shown),
                    Ok(d),
                    "duration {line:?} displays as {shown:?}"
                );
            }
            Err(e) => {
                let _ = e.to_string();
            }
        }
    }
    let rate = rate.unwrap_or(LinkRate::Unlimited);
    let burst = burst.unwrap_or(Burst::DEFAULT);
    let framing = framing.unwrap_or(Framing::DEFAULT);
    if let Some(bps) = rate.bytes_per_second() {
        assert!(bps > 0.0 && bps.is_finite(), "{rate:?}: {bps} B/s");
    }
    if let Some(b) = burst.bytes_at(rate) {
        assert!(b >= 1, "{burst:?} at {rate:?}: {b} bytes");
    }
    let (wire, payload) = framing.wire_ratio();
    assert!(
        wire >= payload && payload > 0,
        "{framing:?}: {wire}/{payload}"
    );
    if let Some(p) = framing.payload_rate(rate) {
        assert!(p > 0.0 && p.is_finite(), "{framing:?} at {rate:?}: {p}");
    }
});
