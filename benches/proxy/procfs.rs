//! What the kernel says about a process: resident memory and CPU time,
//! each summed over the process and its live descendants, so a proxy that
//! relays in worker processes (nginx with a master) is measured whole.

/// Resident set size in bytes (VmRSS), of `pid` and its descendants.
pub fn rss_bytes(pid: u32) -> u64 {
    tree(pid).into_iter().filter_map(own_rss_bytes).sum()
}

/// User plus system CPU time (all threads) of `pid` and its descendants, in
/// seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let ticks: u64 = tree(pid).into_iter().filter_map(own_cpu_ticks).sum();
    ticks as f64 / clock_ticks_per_second()
}

fn own_rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The fields of /proc/PID/stat after the command name, which may hold
/// spaces and is closed by the last ')'.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.get(stat.rfind(')')? + 2..)?;
    Some(rest.split_whitespace().map(String::from).collect())
}

fn own_cpu_ticks(pid: u32) -> Option<u64> {
    let fields = stat_fields(pid)?;
    // utime and stime are fields 14 and 15 of the whole line (1-based).
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// `pid` and every live process below it. The process itself must exist:
/// measuring a proxy that has died is a benchmark failure.
fn tree(pid: u32) -> Vec<u32> {
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process {pid} is gone"
    );
    let parents: Vec<(u32, u32)> = std::fs::read_dir("/proc")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
                .filter_map(|p| {
                    let ppid = stat_fields(p)?.get(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![pid];
    let mut k = 0;
    while k < found.len() {
        let parent = found[k];
        found.extend(
            parents
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        k += 1;
    }
    found
}

fn clock_ticks_per_second() -> f64 {
    let out = std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output();
    out.ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The CPUs a process may run on, as the kernel lists them ("0-1").
pub fn cpus(pid: u32) -> Option<String> {
    cpus_in(&format!("/proc/{pid}/status"))
}

/// The CPUs this process may run on.
pub fn own_cpus() -> Option<String> {
    cpus_in("/proc/self/status")
}

fn cpus_in(path: &str) -> Option<String> {
    let status = std::fs::read_to_string(path).ok()?;
    let line = status
        .lines()
        .find(|l| l.starts_with("Cpus_allowed_list:"))?;
    Some(line.split_whitespace().nth(1)?.to_string())
}
