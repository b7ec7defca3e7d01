//! Peak resident memory of this process, for reports and benchmarks.

/// Peak resident set size in bytes (VmHWM), or 0 where it cannot be read.
pub fn peak_rss_bytes() -> u64 {
    read_status_kb("VmHWM:").map(|kb| kb * 1024).unwrap_or(0)
}

/// Current resident set size in bytes (VmRSS), or 0 where it cannot be read.
pub fn current_rss_bytes() -> u64 {
    read_status_kb("VmRSS:").map(|kb| kb * 1024).unwrap_or(0)
}

fn read_status_kb(key: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}
