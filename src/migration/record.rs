//! What a migration reports: the record written when it ends, and the live view the
//! control API shows while it runs. Field names are the JSON keys of the records file and
//! of `GET /migrations`.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::Serialize;

use crate::link::{Cause, Fidelity, Link};
use crate::qemu::Phase;

/// The link in force at a time.
#[derive(Debug, Clone, Serialize, serde::Deserialize, PartialEq)]
pub struct LinkEntry {
    /// From when (RFC 3339).
    pub at: String,
    /// Line rate.
    pub link: String,
    /// Burst.
    pub burst: String,
    /// Framing.
    pub framing: String,
    /// One-way delay.
    pub delay: String,
}

impl LinkEntry {
    /// The link in force on `link` now.
    pub fn now(link: &Link) -> LinkEntry {
        let shape = link.shape();
        LinkEntry {
            at: rfc3339(SystemTime::now()),
            link: shape.rate.to_string(),
            burst: shape.burst.to_string(),
            framing: shape.framing.to_string(),
            delay: crate::spec::HumanDuration(link.delay()).to_string(),
        }
    }
}

/// A migration in progress, as the control API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ActiveView {
    /// Unique id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// First connection accepted (RFC 3339).
    pub start: String,
    /// Seconds since the start.
    pub elapsed_s: f64,
    /// The main channel's phase.
    pub phase: &'static str,
    /// Pre-copy passes so far.
    pub precopy_passes: u32,
    /// Post-copy page requests so far.
    pub page_requests: u64,
    /// Connections of this migration still open.
    pub open_connections: u32,
    /// Bytes per phase and direction so far.
    pub bytes: DirBytes,
    /// Bytes in the last complete second.
    pub rate_bytes_per_second: RateView,
    /// Guest RAM size, once the setup announced it.
    pub ram_total_bytes: Option<u64>,
    /// Pages (normal and zero) the main channel carried so far.
    pub ram_pages_sent: u64,
    /// Progress indication: RAM covered by the pages sent so far, as a multiple of guest
    /// RAM (reaches 1 at the end of the first pass; later passes resend dirty pages).
    pub ram_sent_ratio: Option<f64>,
    /// Link settings in force, with the time each took effect.
    pub links: Vec<LinkEntry>,
    /// How faithful the link has been so far.
    pub fidelity: FidelityRecord,
}

/// How faithful the emulated link was, per direction (see `Fidelity` in the link).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FidelityRecord {
    /// Source → destination: the migration stream.
    pub to_destination: DirFidelity,
    /// Destination → source: the return path.
    pub to_source: DirFidelity,
    /// Share of the machine's CPU time a hypervisor ran something else while this
    /// migration ran (steal; `null` where the host does not report it): time in which no
    /// link on a virtual machine can keep its rate (see [`crate::host`]).
    pub host_cpu_stolen: Option<f64>,
}

/// One direction's fidelity over a migration.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DirFidelity {
    /// Carried over what the rate allowed while the link had something to carry (`null`
    /// when it never had, or is unlimited): 1.0 is a link that delivered its rate.
    pub ratio: Option<f64>,
    /// Time the link had something to carry: line time of what it carried plus time lost.
    pub backlogged_seconds: f64,
    /// Payload bytes the shaped link carried.
    pub carried_bytes: u64,
    /// Payload bytes the link could have carried while backlogged and did not, by cause:
    /// `late` (its wake-ups came too late for the burst), `destination` (the receiving
    /// side did not take the writes).
    pub shortfall_bytes: BTreeMap<&'static str, u64>,
    /// `ratio` within each phase (`null` where the link was not backlogged).
    pub phases: BTreeMap<&'static str, Option<f64>>,
    /// Time per phase in which the link sat idle waiting for the sender.
    pub idle_seconds: BTreeMap<&'static str, f64>,
}

impl DirFidelity {
    /// From the ledger of each of [`Phase::MIGRATION`].
    pub fn from_phases(phases: &[Fidelity; 4]) -> DirFidelity {
        let mut total = Fidelity::default();
        for f in phases {
            total.add(f);
        }
        DirFidelity {
            ratio: total.ratio().map(round4),
            backlogged_seconds: total.backlogged().as_secs_f64(),
            carried_bytes: total.carried_bytes,
            shortfall_bytes: Cause::ALL
                .iter()
                .map(|c| (c.as_str(), total.shortfall_bytes[c.index()]))
                .collect(),
            phases: Phase::MIGRATION
                .iter()
                .map(|p| (p.as_str(), phases[p.index()].ratio().map(round4)))
                .collect(),
            idle_seconds: Phase::MIGRATION
                .iter()
                .map(|p| (p.as_str(), phases[p.index()].idle.as_secs_f64()))
                .collect(),
        }
    }
}

/// A ratio to four decimals: finer than any host keeps a link, easier to read.
pub(super) fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// Bytes per second, per direction.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct RateView {
    /// Source → destination.
    pub to_destination: u64,
    /// Destination → source.
    pub to_source: u64,
}

/// Bytes per phase, per direction.
#[derive(Debug, Clone, Serialize)]
pub struct DirBytes {
    /// Source → destination.
    pub to_destination: BTreeMap<&'static str, u64>,
    /// Destination → source (return path), by the main channel's phase at the time.
    pub to_source: BTreeMap<&'static str, u64>,
}

/// QEMU's RAM counters, as QEMU defines them.
#[derive(Debug, Clone, Serialize)]
pub struct RamRecord {
    /// QEMU `precopy-bytes`.
    pub precopy_bytes: u64,
    /// QEMU `downtime-bytes`.
    pub downtime_bytes: u64,
    /// QEMU `postcopy-bytes`.
    pub postcopy_bytes: u64,
    /// QEMU `normal`.
    pub normal_pages: u64,
    /// QEMU `duplicate`.
    pub zero_pages: u64,
    /// QEMU `multifd-bytes`.
    pub multifd_bytes: u64,
}

/// Per-second byte counts of both directions.
#[derive(Debug, Clone, Serialize)]
pub struct Series {
    /// Seconds per entry.
    pub interval_s: f64,
    /// Source → destination bytes per interval since the start (interval 0.1 s).
    pub to_destination: Vec<u64>,
    /// Destination → source bytes per interval since the start.
    pub to_source: Vec<u64>,
}

/// One finished migration, as written to the records file.
#[derive(Debug, Clone, Serialize)]
pub struct Record {
    /// Unique id.
    pub id: String,
    /// Route name.
    pub route: String,
    /// First connection accepted (RFC 3339).
    pub start: String,
    /// Last connection closed (RFC 3339).
    pub end: String,
    /// `end - start` in seconds.
    pub duration_s: f64,
    /// `completed`, `failed`, `unknown` (stream not parsed), `interrupted` or `refused`.
    pub outcome: String,
    /// Why it failed: reset, upstream error, return-path SHUT code, truncated stream.
    pub cause: Option<String>,
    /// How `outcome` was judged when the stream's own end could not be seen (a TLS
    /// migration whose connections all closed cleanly); absent otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outcome_basis: Option<String>,
    /// Link settings in force, with the time each took effect.
    pub links: Vec<LinkEntry>,
    /// Bytes per phase and direction.
    pub bytes: DirBytes,
    /// Wall time per phase, in seconds.
    pub duration_s_by_phase: BTreeMap<&'static str, f64>,
    /// Source → destination bytes per second of each phase.
    pub throughput_bytes_per_second: BTreeMap<&'static str, f64>,
    /// Pre-copy passes.
    pub precopy_passes: u32,
    /// Target page size, when learned.
    pub page_size: Option<u32>,
    /// QEMU's RAM counters.
    pub ram: RamRecord,
    /// Post-copy page requests on the return path.
    pub page_requests: u64,
    /// Connections by channel kind.
    pub channels: BTreeMap<&'static str, u32>,
    /// Bytes the parser could not interpret (counted in their phase all the same).
    pub opaque_bytes: u64,
    /// How faithful the emulated link was.
    pub fidelity: FidelityRecord,
    /// Throughput over time.
    pub series: Series,
}

/// A time as RFC 3339 with milliseconds, as records show times.
pub(super) fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}
