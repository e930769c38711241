//! Process figures from `/proc/self/stat` and `/proc/self/statm`: parsing is pure,
//! [`read_self`] does the reads.

use std::time::Duration;

/// RSS and CPU time of a process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// Resident set size, bytes.
    pub rss_bytes: u64,
    /// User + system CPU time.
    pub cpu: Duration,
}

/// User + system CPU ticks from the text of `/proc/<pid>/stat` (fields 14 and 15, counted
/// after the parenthesised command name, which may itself contain spaces and parentheses).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let after = &stat[stat.rfind(')')? + 1..];
    let mut fields = after.split_whitespace();
    // After `)`: state is field 3, so utime (14) is the 12th and stime (15) the 13th.
    let utime: u64 = fields.nth(11)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// Resident pages from the text of `/proc/<pid>/statm` (its second field).
pub fn parse_resident_pages(statm: &str) -> Option<u64> {
    statm.split_whitespace().nth(1)?.parse().ok()
}

/// Reads this process's figures; `None` where `/proc` is unavailable.
pub fn read_self() -> Option<ProcStat> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let ticks = parse_cpu_ticks(&stat)?;
    let pages = parse_resident_pages(&statm)?;
    let sysconf = |v| nix::unistd::sysconf(v).ok().flatten().filter(|n| *n > 0);
    let hz = sysconf(nix::unistd::SysconfVar::CLK_TCK).unwrap_or(100) as u64;
    let page = sysconf(nix::unistd::SysconfVar::PAGE_SIZE).unwrap_or(4096) as u64;
    Some(ProcStat {
        rss_bytes: pages * page,
        cpu: Duration::from_millis(ticks.saturating_mul(1000) / hz),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_a_hostile_command_name() {
        let stat = "1234 (we) ird (x) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 37 0 0 20 0 4 0 \
                    100 10000 500 18446744073709551615";
        assert_eq!(parse_cpu_ticks(stat), Some(287));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        assert_eq!(parse_resident_pages("5000 1200 300 1 0 900 0"), Some(1200));
        assert_eq!(parse_resident_pages(""), None);
    }

    #[test]
    fn reads_this_process() {
        let p = read_self().expect("/proc is mounted on Linux");
        assert!(p.rss_bytes > 0);
    }
}
