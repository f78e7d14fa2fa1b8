//! The text `holdfast vos` and `holdfast pair` print, laid out after AFS `vos`.
//! Invariant: pure functions of their arguments; every line ends with a newline.

use std::fmt::Write;

use proto::{GraceState, MemberRole, ServerEntry, Timestamp, VolumeEntry, VolumeInfo, VolumeType};

use crate::admin::server_label;
use crate::pair::{MemberStatus, PairReport, SwitchoverReport};

/// A VLDB entry: its ids and its sites, with each site's server addresses.
pub fn format_entry(entry: &VolumeEntry, servers: &[ServerEntry]) -> String {
    let mut out = format!("{}\n", entry.name);
    let mut ids = format!("    RWrite: {}", entry.rw_id);
    if let Some(ro) = entry.ro_id {
        let _ = write!(ids, "    ROnly: {ro}");
    }
    if let Some(backup) = entry.backup_id {
        let _ = write!(ids, "    Backup: {backup}");
    }
    let _ = writeln!(out, "{ids}");
    let _ = writeln!(out, "    number of sites -> {}", entry.sites.len());
    for site in &entry.sites {
        let _ = writeln!(
            out,
            "       server {} {} Site",
            server_label(site.server, servers),
            kind_label(site.kind)
        );
    }
    out
}

/// `vos examine`: the fileserver's view of the volume when there is one, then its entry.
pub fn format_examine(
    entry: &VolumeEntry,
    info: Option<&VolumeInfo>,
    servers: &[ServerEntry],
) -> String {
    let mut out = String::new();
    match info {
        Some(info) => {
            out.push_str(&volume_line(info));
            if let Some(site) = entry.sites.iter().find(|s| s.kind == info.kind) {
                let _ = writeln!(out, "    {}", server_label(site.server, servers));
            }
            let _ = writeln!(
                out,
                "    RWrite {:>10} ROnly {:>10} Backup {:>10}",
                entry.rw_id,
                optional(entry.ro_id),
                optional(entry.backup_id)
            );
            let _ = writeln!(out, "    MaxQuota {}", quota_label(info.quota_bytes));
            let _ = writeln!(out, "    Creation {}", timestamp_label(info.created));
            let _ = writeln!(out, "    Files    {}", info.file_count);
        }
        None => {
            let _ = writeln!(out, "{:<32} {:>10} RW", entry.name.as_str(), entry.rw_id);
            out.push_str("    **** could not get the volume's status from its fileserver\n");
        }
    }
    out.push('\n');
    out.push_str(&format_entry(entry, servers));
    out
}

/// `vos listvldb`: every entry, then the count.
pub fn format_listvldb(entries: &[VolumeEntry], servers: &[ServerEntry]) -> String {
    let mut out = String::from("VLDB entries for all servers\n");
    for entry in entries {
        out.push('\n');
        out.push_str(&format_entry(entry, servers));
    }
    let _ = writeln!(out, "\nTotal entries: {}", entries.len());
    out
}

/// `vos listvol`: per fileserver, its volumes one per line.
pub fn format_listvol(listing: &[(ServerEntry, Vec<VolumeInfo>)]) -> String {
    let mut out = String::new();
    for (index, (server, volumes)) in listing.iter().enumerate() {
        if index > 0 {
            out.push('\n');
        }
        let _ = writeln!(
            out,
            "Total number of volumes on server {}: {}",
            server_label(server.server, std::slice::from_ref(server)),
            volumes.len()
        );
        for info in volumes {
            out.push_str(&volume_line(info));
        }
    }
    out
}

/// `holdfast pair status`: the VLDB's view of the pair, then each member's own account.
pub fn format_pair_status(report: &PairReport) -> String {
    let pair = &report.pair;
    let mut out = format!(
        "pair {}: epoch {}, active {}, lease left {} ms",
        pair.name,
        pair.epoch,
        pair.active.as_deref().unwrap_or("none"),
        pair.lease_left_ms
    );
    if let Some(successor) = &pair.successor {
        let _ = write!(out, ", handing over to {successor}");
    }
    out.push('\n');
    for member in &report.members {
        let _ = write!(out, "  {}  ", member.address);
        match &member.status {
            MemberStatus::Answered(state) => {
                out.push_str(role_label(state.role));
                if state.epoch != pair.epoch {
                    let _ = write!(out, " at epoch {}", state.epoch);
                }
                if let Some(grace) = &state.grace {
                    let _ = write!(out, "  {}", grace_label(grace));
                }
            }
            MemberStatus::Unreachable(error) => {
                let _ = write!(out, "unreachable: {error}");
            }
            MemberStatus::Refused(code) => {
                let _ = write!(out, "refused: {code}");
            }
        }
        out.push('\n');
    }
    out
}

/// `holdfast pair switchover`: who handed over to whom, and how long it took.
pub fn format_switchover(report: &SwitchoverReport) -> String {
    format!(
        "pair {}: switched over from {} to {} (epoch {}) in {} ms\n",
        report.pair,
        report.from,
        report.to,
        report.epoch,
        report.elapsed.as_millis()
    )
}

fn role_label(role: MemberRole) -> &'static str {
    match role {
        MemberRole::Active => "active",
        MemberRole::Passive => "passive",
        MemberRole::Single => "not in a pair",
    }
}

fn grace_label(grace: &GraceState) -> String {
    format!(
        "grace: {:.1} s left, {}/{} clients reclaimed, {} lock{} not reclaimed",
        grace.remaining_ms as f64 / 1000.0,
        grace.clients_reclaimed,
        grace.clients_recovered,
        grace.locks_unreclaimed,
        if grace.locks_unreclaimed == 1 {
            ""
        } else {
            "s"
        }
    )
}

/// One volume's header line, as AFS `vos` prints it: name, id, type, size, state.
fn volume_line(info: &VolumeInfo) -> String {
    format!(
        "{:<32} {:>10} {} {:>10} K  On-line\n",
        info.name.as_str(),
        info.id,
        kind_label(info.kind),
        info.bytes_used.div_ceil(1024)
    )
}

fn kind_label(kind: VolumeType) -> &'static str {
    match kind {
        VolumeType::ReadWrite => "RW",
        VolumeType::ReadOnly => "RO",
        VolumeType::Backup => "BK",
    }
}

fn optional(id: Option<proto::VolumeId>) -> String {
    id.map_or_else(|| "-".into(), |id| id.to_string())
}

fn quota_label(quota_bytes: u64) -> String {
    if quota_bytes == 0 {
        "unlimited".into()
    } else {
        format!("{} K", quota_bytes.div_ceil(1024))
    }
}

/// `YYYY-MM-DD HH:MM:SS UTC`, computed by hand to keep a date crate out of the tree.
fn timestamp_label(time: Timestamp) -> String {
    const SECS_PER_DAY: i64 = 86_400;
    let days = time.secs.div_euclid(SECS_PER_DAY);
    let secs_of_day = time.secs.rem_euclid(SECS_PER_DAY);
    let (year, month, day) = civil_from_days(days);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs_of_day / 3600,
        secs_of_day % 3600 / 60,
        secs_of_day % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// `vos counters`: the fileserver, its counters as `name value` lines, then the
/// histograms that counted anything (count, p50, p90, p99, max).
pub fn format_figures(server: &ServerEntry, figures: &proto::histogram::Figures) -> String {
    format!(
        "Fileserver {}\n{}",
        server.addresses.join(" "),
        figures.render()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_reads_in_seconds_with_plurals() {
        let grace = |locks_unreclaimed| GraceState {
            remaining_ms: 12_345,
            clients_recovered: 2,
            clients_reclaimed: 1,
            locks_unreclaimed,
        };
        assert_eq!(
            grace_label(&grace(1)),
            "grace: 12.3 s left, 1/2 clients reclaimed, 1 lock not reclaimed"
        );
        assert_eq!(
            grace_label(&grace(0)),
            "grace: 12.3 s left, 1/2 clients reclaimed, 0 locks not reclaimed"
        );
    }

    #[test]
    fn timestamps_read_as_utc_dates() {
        let at = |secs| timestamp_label(Timestamp { secs, nanos: 0 });
        assert_eq!(at(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(at(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(at(1_700_000_000), "2023-11-14 22:13:20 UTC");
        assert_eq!(at(-1), "1969-12-31 23:59:59 UTC");
    }
}
