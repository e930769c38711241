//! Per-shard resource limits: rlimits a shard applies to itself, and cgroup v2 limits the
//! hub applies where the hierarchy is writable.
//!
//! Both report which limits applied and which did not ([`LimitReport`]); callers log the
//! report, so an operator can see from the log what is actually enforced.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::config::ShardLimits;
use crate::ids::ShardId;

/// Which limits were applied and which were not (with the reason).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LimitReport {
    /// `name=value` of each applied limit.
    pub applied: Vec<String>,
    /// `name: reason` of each requested limit that could not be applied.
    pub failed: Vec<String>,
}

impl fmt::Display for LimitReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let none = |v: &Vec<String>| {
            if v.is_empty() {
                "none".to_owned()
            } else {
                v.join(", ")
            }
        };
        write!(
            f,
            "applied=[{}] not_applied=[{}]",
            none(&self.applied),
            none(&self.failed)
        )
    }
}

/// Applies `RLIMIT_NOFILE` and `RLIMIT_AS` from `limits` to the calling process.
///
/// Sets soft and hard limits to the value; if raising the hard limit is not permitted, the
/// soft limit is set to the lower of the value and the current hard limit, and the report
/// says so.
pub fn apply_rlimits(limits: &ShardLimits) -> LimitReport {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let mut report = LimitReport::default();
    let mut set = |name: &str, res: Resource, value: u64| match setrlimit(res, value, value) {
        Ok(()) => report.applied.push(format!("{name}={value}")),
        Err(e) => {
            let hard = getrlimit(res).map(|(_, h)| h).unwrap_or(0);
            let soft = value.min(hard);
            match setrlimit(res, soft, hard) {
                Ok(()) => {
                    report.applied.push(format!("{name}={soft}"));
                    if soft < value {
                        report
                            .failed
                            .push(format!("{name}={value}: capped by hard limit {hard} ({e})"));
                    }
                }
                Err(e2) => report.failed.push(format!("{name}={value}: {e2}")),
            }
        }
    };
    if let Some(n) = limits.open_files {
        set("RLIMIT_NOFILE", Resource::RLIMIT_NOFILE, n);
    }
    if let Some(a) = limits.address_space_bytes {
        set("RLIMIT_AS", Resource::RLIMIT_AS, a);
    }
    report
}

const CGROUP_ROOT: &str = "/sys/fs/cgroup";
const CPU_PERIOD_US: u64 = 100_000;

/// The hub's cgroup v2 sub-tree (`<own cgroup>/sibyl-<hub pid>/shard-<group>-<index>`), if
/// the hierarchy is v2 and writable.
#[derive(Debug)]
pub struct Cgroups {
    base: Result<PathBuf, String>,
    created: bool,
}

impl Cgroups {
    /// Probes the cgroup hierarchy; never fails (an unusable hierarchy is recorded and
    /// reported by [`Cgroups::attach`]). Creates nothing until a shard needs it.
    pub fn probe() -> Self {
        Self {
            base: probe_base(Path::new(CGROUP_ROOT)),
            created: false,
        }
    }

    /// Why cgroup limits are unavailable, if they are.
    pub fn unavailable(&self) -> Option<&str> {
        self.base.as_ref().err().map(String::as_str)
    }

    /// Creates the shard's cgroup, writes `memory.max` / `cpu.max` and moves `pid` into it.
    /// Does nothing (empty report) if `limits` sets neither.
    pub fn attach(&mut self, shard: ShardId, pid: u32, limits: &ShardLimits) -> LimitReport {
        let mut report = LimitReport::default();
        let wanted: Vec<(&str, String)> = [
            limits.memory_bytes.map(|m| ("memory.max", m.to_string())),
            limits.cpu_percent.map(|p| {
                (
                    "cpu.max",
                    format!("{} {CPU_PERIOD_US}", u64::from(p) * CPU_PERIOD_US / 100),
                )
            }),
        ]
        .into_iter()
        .flatten()
        .collect();
        if wanted.is_empty() {
            return report;
        }
        let base = match &self.base {
            Ok(b) => b.clone(),
            Err(why) => {
                report
                    .failed
                    .extend(wanted.iter().map(|(n, v)| format!("{n}={v}: {why}")));
                return report;
            }
        };
        if !self.created {
            if let Err(e) = std::fs::create_dir_all(&base) {
                report.failed.extend(
                    wanted
                        .iter()
                        .map(|(n, v)| format!("{n}={v}: mkdir {}: {e}", base.display())),
                );
                return report;
            }
            self.created = true;
            // Delegate controllers down the tree; failures surface as missing files below.
            if let Some(parent) = base.parent() {
                let _ = std::fs::write(parent.join("cgroup.subtree_control"), "+memory +cpu");
            }
            let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu");
        }
        let dir = base.join(format!("shard-{}-{}", shard.group, shard.index));
        if let Err(e) = std::fs::create_dir_all(&dir) {
            report.failed.extend(
                wanted
                    .iter()
                    .map(|(n, v)| format!("{n}={v}: mkdir {}: {e}", dir.display())),
            );
            return report;
        }
        let mut ok = Vec::new();
        for (name, value) in &wanted {
            match std::fs::write(dir.join(name), value) {
                Ok(()) => ok.push(format!("{name}={value}")),
                Err(e) => report.failed.push(format!("{name}={value}: {e}")),
            }
        }
        match std::fs::write(dir.join("cgroup.procs"), pid.to_string()) {
            Ok(()) => report.applied = ok,
            Err(e) => report
                .failed
                .extend(ok.into_iter().map(|l| format!("{l}: cgroup.procs: {e}"))),
        }
        report
    }

    /// Removes a shard's cgroup after its process exited (best effort).
    pub fn release(&self, shard: ShardId) {
        if let (Ok(base), true) = (&self.base, self.created) {
            let _ =
                std::fs::remove_dir(base.join(format!("shard-{}-{}", shard.group, shard.index)));
        }
    }

    /// Removes every cgroup this hub created (best effort; call after all shards exited).
    pub fn cleanup(&mut self) {
        if let (Ok(base), true) = (&self.base, self.created) {
            if let Ok(entries) = std::fs::read_dir(base) {
                for e in entries.flatten() {
                    if e.path().is_dir() {
                        let _ = std::fs::remove_dir(e.path());
                    }
                }
            }
            let _ = std::fs::remove_dir(base);
            self.created = false;
        }
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        self.cleanup();
    }
}

fn probe_base(root: &Path) -> Result<PathBuf, String> {
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(|_| format!("cgroup v2 not mounted at {}", root.display()))?;
    let own = std::fs::read_to_string("/proc/self/cgroup")
        .map_err(|e| format!("/proc/self/cgroup: {e}"))?;
    let rel = own
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .ok_or_else(|| "no cgroup v2 entry in /proc/self/cgroup".to_owned())?;
    let own_dir = root.join(rel.trim_start_matches('/'));
    let base = own_dir.join(format!("sibyl-{}", std::process::id()));
    let _ = controllers;
    // Writability check without creating anything: access(2) on the parent.
    nix::unistd::access(&own_dir, nix::unistd::AccessFlags::W_OK)
        .map_err(|e| format!("{} not writable: {e}", own_dir.display()))?;
    Ok(base)
}

/// The calling process's resident set size, from `/proc/self/statm` (0 if unavailable).
pub fn rss_bytes() -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .nth(1)
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |pages| pages * page)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_display_names_applied_and_not() {
        let r = LimitReport {
            applied: vec!["RLIMIT_NOFILE=64".into()],
            failed: vec!["memory.max=1: no".into()],
        };
        assert_eq!(
            r.to_string(),
            "applied=[RLIMIT_NOFILE=64] not_applied=[memory.max=1: no]"
        );
        assert_eq!(
            LimitReport::default().to_string(),
            "applied=[none] not_applied=[none]"
        );
    }

    #[test]
    fn rlimits_apply_in_a_child_process() {
        // setrlimit is process-wide and irreversible for the hard limit, so check it in a
        // forked-free way: apply a no-op-sized limit equal to the current soft NOFILE.
        use nix::sys::resource::{Resource, getrlimit};
        let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let r = apply_rlimits(&ShardLimits {
            open_files: Some(soft),
            ..ShardLimits::default()
        });
        assert!(
            r.applied.iter().any(|a| a.starts_with("RLIMIT_NOFILE=")),
            "{r}"
        );
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap().0, soft);
    }

    #[test]
    fn cgroup_attach_reports_why_limits_did_not_apply() {
        let mut cg = Cgroups {
            base: Err("cgroup v2 not mounted".into()),
            created: false,
        };
        let limits = ShardLimits {
            memory_bytes: Some(64 << 20),
            cpu_percent: Some(50),
            ..ShardLimits::default()
        };
        let r = cg.attach(ShardId { group: 0, index: 0 }, 1, &limits);
        assert!(r.applied.is_empty());
        assert_eq!(r.failed.len(), 2);
        assert!(r.failed[0].starts_with("memory.max=67108864: cgroup v2 not mounted"));
        assert!(r.failed[1].starts_with("cpu.max=50000 100000"));
        // No cgroup limits requested: nothing to report.
        assert_eq!(
            cg.attach(ShardId { group: 0, index: 0 }, 1, &ShardLimits::default()),
            LimitReport::default()
        );
    }

    #[test]
    fn probe_refuses_a_non_v2_root() {
        let dir = tempfile::tempdir().unwrap();
        assert!(
            probe_base(dir.path())
                .unwrap_err()
                .contains("cgroup v2 not mounted")
        );
    }

    #[test]
    fn rss_is_reported() {
        assert!(rss_bytes() > 0);
    }
}
