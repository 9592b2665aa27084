//! The tests that read the test process's own RSS: apart from the others (whose hosts would
//! grow it), and one at a time among themselves (`measuring_memory`).

mod backing_off;
mod cycles;
mod pinned_bodies;
mod refused_files;
mod requests;
mod stalled_tail;

/// The test process's resident memory, in MiB.
pub fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").expect("reading /proc/self/status");
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/self/status");
    kib / 1024
}
