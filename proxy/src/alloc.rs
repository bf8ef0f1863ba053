//! Memory allocator settings, so the gateway's resident set follows the load down again.
//!
//! The gateway runs on the system allocator, glibc's malloc on the gnu targets (the Docker
//! image is Debian/distroless, glibc). glibc raises its mmap threshold dynamically: every time
//! a chunk that was allocated with `mmap` is freed, later allocations up to that size (at most
//! 32 MiB on 64-bit) come from the heap arenas instead. After the first multi-MiB payload the
//! gateway's payload buffers therefore live in the arenas (up to 8 per core), where freed
//! memory is returned to the system only from the top of each heap: after a burst of large
//! payloads the memory stays resident (`scripts/soak.sh`: 256 MiB still resident 30 s after a
//! 150-workflow load, peak 274 MiB).
//!
//! So, on glibc:
//! - `M_MMAP_THRESHOLD` is fixed at [`MMAP_THRESHOLD`] (128 KiB, glibc's own starting value),
//!   which turns the dynamic adjustment off: every allocation at or above it is a mapping of
//!   its own, returned to the system when freed, so large buffers never leave holes in the
//!   arenas. The price would be a page fault per 4 KiB on first touch of each such buffer
//!   and an unmap when it is freed; 4 MiB kept the peak of the 600-workflow soak above its
//!   bound (3 × in flight + 64 MiB) and 128 KiB brings it well under (BENCHMARKS.md, "Memory
//!   after load"). The gateway's own large buffers (collected messages, codec output,
//!   decompressed payloads) therefore come from [`payload_gateway::buffers`], a bounded pool
//!   that keeps their pages mapped between messages and is emptied when the process is quiet:
//!   page faults and unmapping fell from 10 % to 2 % of the gateway's CPU at 1 MiB
//!   (BENCHMARKS.md, "Issue 24", "Codec rate"), so there is no CPU-for-memory setting left to
//!   choose. What remains is h2's own read buffers.
//! - `M_TRIM_THRESHOLD` is [`TRIM_THRESHOLD`] (8 MiB), so freeing a buffer at the top of a heap
//!   does not hand back memory the next RPC faults in again.
//! - `M_ARENA_MAX` is the number of CPUs (glibc's default is 8 per CPU): fewer arenas hold
//!   fewer free holes, which lowers the peak as well.
//! - A thread looks every [`TRIM_INTERVAL`] at the CPU time the process used; after a quiet
//!   interval (less than [`QUIET_CPU`] of it) it calls `malloc_trim(0)` once, which returns
//!   the free pages inside the arenas. So the resident set comes back near the live data
//!   within two intervals after a load, and a busy gateway never pays for re-faulting
//!   trimmed pages.
//!
//! Figures (same soak, before/after, and jemalloc and mimalloc, both worse here):
//! BENCHMARKS.md, "Memory after load".
//!
//! An operator who tunes glibc malloc already (`GLIBC_TUNABLES` with a `glibc.malloc.`
//! setting, or one of the `MALLOC_*_` variables) keeps those settings: nothing is changed.

use std::time::Duration;

/// Allocations at or above this many bytes are mapped on their own and unmapped when freed.
pub const MMAP_THRESHOLD: usize = 128 * 1024;

/// Free memory at the top of a heap beyond this is returned at once.
pub const TRIM_THRESHOLD: usize = 8 * 1024 * 1024;

/// How often the trim thread looks at the process's CPU time.
pub const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// An interval in which the process used less CPU time than this is quiet: memory is trimmed.
pub const QUIET_CPU: Duration = Duration::from_millis(250);

/// At most this many malloc arenas: one per CPU (glibc's default is 8 per CPU).
pub fn arena_max() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// glibc's own malloc settings in the environment: when one is set, [`tune`] changes nothing.
const GLIBC_MALLOC_VARS: &[&str] = &[
    "MALLOC_ARENA_MAX",
    "MALLOC_ARENA_TEST",
    "MALLOC_MMAP_MAX_",
    "MALLOC_MMAP_THRESHOLD_",
    "MALLOC_TOP_PAD_",
    "MALLOC_TRIM_THRESHOLD_",
];

/// What [`tune`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tuning {
    /// The fixed mmap and trim thresholds and the arena bound are in force.
    Applied,
    /// The environment sets glibc malloc options: left as they are.
    OperatorSettings,
    /// glibc refused a setting (`mallopt` returned 0).
    Refused,
    /// Not a glibc target: the allocator's own behaviour applies.
    #[cfg_attr(all(target_os = "linux", target_env = "gnu"), allow(dead_code))]
    NotGlibc,
}

/// Sets glibc malloc's mmap and trim thresholds and arena bound unless the environment sets malloc
/// options. Call first thing in `main`, before any thread starts (arenas are created per
/// thread on first contention).
pub fn tune() -> Tuning {
    if operator_tuned(|name| std::env::var_os(name)) {
        return Tuning::OperatorSettings;
    }
    apply()
}

/// Starts the thread that returns free arena memory once the process has been quiet for a
/// [`TRIM_INTERVAL`] (glibc only; the long-running `run` command only). It runs until the
/// process exits.
pub fn start_trimmer() -> std::io::Result<()> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    std::thread::Builder::new()
        .name("pgw-malloc-trim".to_owned())
        .spawn(|| {
            let mut last = cpu_time();
            let mut trimmed = false;
            loop {
                std::thread::sleep(TRIM_INTERVAL);
                let now = cpu_time();
                let quiet = now.saturating_sub(last) < QUIET_CPU;
                last = now;
                if !quiet {
                    trimmed = false;
                } else if !trimmed {
                    // The pool's kept buffers first: they are mappings of their own, so
                    // freeing them returns their memory at once.
                    payload_gateway::buffers::release_all();
                    // SAFETY: malloc_trim takes the arena locks itself; no pointer is passed.
                    unsafe { libc::malloc_trim(0) };
                    trimmed = true;
                    // The trim's own CPU time does not make the next interval busy.
                    last = cpu_time();
                }
            }
        })?;
    Ok(())
}

/// User + system CPU time of the whole process so far.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cpu_time() -> Duration {
    // SAFETY: getrusage writes into the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        if libc::getrusage(libc::RUSAGE_SELF, &mut usage) != 0 {
            return Duration::MAX;
        }
        usage
    };
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec.max(0) as u64) + Duration::from_micros(t.tv_usec.max(0) as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn operator_tuned(var: impl Fn(&str) -> Option<std::ffi::OsString>) -> bool {
    let tunables =
        var("GLIBC_TUNABLES").is_some_and(|v| v.to_string_lossy().contains("glibc.malloc."));
    tunables || GLIBC_MALLOC_VARS.iter().any(|name| var(name).is_some())
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn apply() -> Tuning {
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread
    // exists and with values within glibc's documented ranges.
    let arenas = libc::c_int::try_from(arena_max()).unwrap_or(libc::c_int::MAX);
    let ok = unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD as libc::c_int) == 1
            && libc::mallopt(libc::M_ARENA_MAX, arenas) == 1
    };
    if ok { Tuning::Applied } else { Tuning::Refused }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn apply() -> Tuning {
    Tuning::NotGlibc
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<OsString> {
        let pairs: Vec<(String, OsString)> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), OsString::from(v)))
            .collect();
        move |name| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        }
    }

    #[test]
    fn operator_settings_win() {
        assert!(!operator_tuned(env(&[])));
        assert!(!operator_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.rtld.nns=2"
        )])));
        assert!(operator_tuned(env(&[(
            "GLIBC_TUNABLES",
            "glibc.rtld.nns=2:glibc.malloc.arena_max=4"
        )])));
        assert!(operator_tuned(env(&[("MALLOC_ARENA_MAX", "4")])));
        assert!(operator_tuned(env(&[("MALLOC_MMAP_THRESHOLD_", "65536")])));
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_settings() {
        assert_eq!(apply(), Tuning::Applied);
        assert!(arena_max() >= 1);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn cpu_time_counts_this_process() {
        let before = cpu_time();
        let mut x = 0u64;
        while cpu_time().saturating_sub(before) < Duration::from_millis(20) {
            x = std::hint::black_box(x.wrapping_add(1));
        }
        assert!(cpu_time() > before && cpu_time() < Duration::MAX);
    }
}
