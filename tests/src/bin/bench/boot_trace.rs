//! Where a Linux guest's boot time goes, VMM beside VMM: one boot under
//! each with `initcall_debug` (quiet, so the lines stay in the kernel's log
//! and cost no console output), the log read back through the init's
//! `tessera.dmesg=1`, and the logs compared: milestones, the initcalls that
//! took longest, the longest silences, and the initcalls whose time
//! differs most between the VMMs.

use std::collections::BTreeMap;

use serde_json::json;

/// Boot arguments added to a timed boot's for the traced one.
pub(crate) const TRACE_ARGS: &str = "printk.time=1 initcall_debug log_buf_len=4M tessera.dmesg=1";

/// Kernel log lines whose first time stamp marks a stage of the boot.
const MILESTONES: &[&str] = &[
    "Linux version",
    "tsc: ",
    "Freeing SMP alternatives",
    "smpboot: CPU0",
    "clocksource: Switched to clocksource",
    "Freeing unused kernel image",
    "Run /init as init process",
];

/// How many entries each ranking keeps.
const TOP: usize = 12;

/// A guest kernel's log as the init printed it, with the kernel's uptime
/// when the init printed its marker.
pub(crate) struct BootLog {
    uptime_at_marker_s: f64,
    /// (time stamp in seconds, text) per line.
    lines: Vec<(f64, String)>,
}

/// The kernel's uptime (seconds) when the init printed its marker, from a
/// console transcript.
pub(crate) fn uptime_at_marker_s(console: &str) -> Option<f64> {
    console
        .lines()
        .find_map(|line| line.trim_end_matches('\r').strip_prefix("tessera.uptime="))?
        .trim()
        .parse()
        .ok()
}

impl BootLog {
    /// The log in a console transcript, if the init printed one.
    pub(crate) fn parse(console: &str) -> Option<Self> {
        let uptime_at_marker_s = uptime_at_marker_s(console)?;
        let begin = console.find("tessera.dmesg=begin")?;
        let end = console.find("tessera.dmesg=end")?;
        let lines = console
            .get(begin..end)?
            .lines()
            .filter_map(|line| {
                let (stamp, text) = line.trim_start().strip_prefix('[')?.split_once(']')?;
                Some((stamp.trim().parse().ok()?, text.trim().to_string()))
            })
            .collect();
        Some(Self {
            uptime_at_marker_s,
            lines,
        })
    }

    /// Milliseconds each initcall took (`initcall X returned R after N usecs`).
    fn initcalls(&self) -> BTreeMap<String, f64> {
        self.lines
            .iter()
            .filter_map(|(_, text)| {
                let rest = text.strip_prefix("initcall ")?;
                let (name, after) = rest.split_once(" returned ")?;
                let usecs = after.split(" after ").nth(1)?.strip_suffix(" usecs")?;
                let name = name.split('+').next()?.trim().to_string();
                Some((name, usecs.trim().parse::<f64>().ok()? / 1000.0))
            })
            .collect()
    }

    fn milestones(&self) -> serde_json::Value {
        MILESTONES
            .iter()
            .filter_map(|needle| {
                let (at, _) = self.lines.iter().find(|(_, text)| text.contains(needle))?;
                Some((needle.trim().to_string(), json!(at * 1000.0)))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }

    /// The longest spans between two consecutive lines, with both lines.
    fn longest_silences(&self) -> Vec<serde_json::Value> {
        let mut silences: Vec<_> = self
            .lines
            .windows(2)
            .map(|pair| (pair[1].0 - pair[0].0, &pair[0], &pair[1]))
            .collect();
        silences.sort_by(|a, b| b.0.total_cmp(&a.0));
        silences
            .into_iter()
            .take(TOP)
            .map(|(span, before, after)| {
                json!({"ms": span * 1000.0, "at_ms": before.0 * 1000.0, "after": before.1, "before": after.1})
            })
            .collect()
    }

    /// This boot's breakdown, as JSON.
    pub(crate) fn report(&self) -> serde_json::Value {
        let initcalls = self.initcalls();
        let mut slowest: Vec<_> = initcalls.iter().collect();
        slowest.sort_by(|a, b| b.1.total_cmp(a.1));
        json!({
            "uptime_at_init_marker_ms": self.uptime_at_marker_s * 1000.0,
            "milestones_ms": self.milestones(),
            "initcalls_total_ms": initcalls.values().sum::<f64>(),
            "slowest_initcalls_ms": slowest.into_iter().take(TOP).collect::<Vec<_>>(),
            "longest_silences": self.longest_silences(),
        })
    }
}

/// The initcalls whose time differs most between two boots, as
/// `[name, ours_ms, theirs_ms]`.
pub(crate) fn initcall_differences(ours: &BootLog, theirs: &BootLog) -> serde_json::Value {
    let (ours, theirs) = (ours.initcalls(), theirs.initcalls());
    let mut differences: Vec<_> = ours
        .iter()
        .filter_map(|(name, ms)| Some((name, *ms, *theirs.get(name)?)))
        .collect();
    differences.sort_by(|a, b| (b.1 - b.2).abs().total_cmp(&(a.1 - a.2).abs()));
    differences.truncate(TOP);
    json!(differences)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONSOLE: &str = "TESSERA-GUEST-UP\r\ntessera.uptime=1.52\r\ntessera.dmesg=begin\r\n\
        [    0.000000] Linux version 6.1.0\r\n\
        [    0.100000] calling  pit_timer_init+0x0/0x40 @ 1\r\n\
        [    0.400000] initcall pit_timer_init+0x0/0x40 returned 0 after 300000 usecs\r\n\
        [    1.500000] Run /init as init process\r\n\
        tessera.dmesg=end\r\n";

    #[test]
    fn a_console_log_gives_initcall_times_milestones_and_silences() {
        let log = BootLog::parse(CONSOLE).expect("log");
        assert_eq!(log.uptime_at_marker_s, 1.52);
        assert_eq!(log.initcalls()["pit_timer_init"], 300.0);
        let report = log.report();
        assert_eq!(report["milestones_ms"]["Run /init as init process"], 1500.0);
        let silence = &report["longest_silences"][0];
        assert!((silence["ms"].as_f64().unwrap() - 1100.0).abs() < 1e-6);
        assert_eq!(silence["before"], "Run /init as init process");
    }

    #[test]
    fn a_console_without_the_dump_gives_no_log() {
        assert!(BootLog::parse("TESSERA-GUEST-UP\n").is_none());
    }
}
