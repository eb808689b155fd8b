//! What the operating system says about memory: the machine's (or the
//! container's) total, this process's resident set, and handing freed heap
//! back to the system after a model is unloaded.

/// Bytes of memory this process may use: the machine's RAM, or the
/// container's cgroup limit when that is lower.
pub fn cpu_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())?
        * 1024;
    let limit = [
        "/sys/fs/cgroup/memory.max",
        "/sys/fs/cgroup/memory/memory.limit_in_bytes",
    ]
    .iter()
    .filter_map(|p| std::fs::read_to_string(p).ok())
    .find_map(|s| s.trim().parse::<u64>().ok());
    Some(limit.map_or(total, |l| l.min(total)))
}

/// This process's resident memory in bytes.
pub fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * page_size())
}

fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions; it only reads a constant.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).ok().filter(|s| *s > 0).unwrap_or(4096)
}

/// Sets the C allocator's thresholds so that freed model memory can go back
/// to the system. By default glibc raises its trim threshold up to 64 MiB as
/// large blocks are freed, and never trims the heap top of a thread's arena
/// below it, so an unloaded model would leave tens of MB resident for good.
/// Call once, before threads start.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any
    // other thread exists.
    unsafe {
        // Blocks above 4 MiB are mapped and unmapped on their own.
        libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
        // Free memory above 8 MiB at an arena's top is handed back on free.
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 << 20);
    }
}

/// Returns freed heap pages to the system, so an unloaded model's memory
/// leaves the resident set instead of waiting in the allocator's free lists.
pub fn release_free_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_system_reports_memory() {
        let total = super::cpu_total().unwrap();
        let rss = super::resident().unwrap();
        assert!(total > 1 << 28 && rss > 0 && rss < total, "{total} {rss}");
        super::release_free_heap();
    }
}
