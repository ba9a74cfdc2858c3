//! Converts the kernel's CLOCK_MONOTONIC timestamps (bpf_ktime_get_ns) to wall-clock time.
//! The offset is measured once at start; NTP slews of the wall clock afterwards are not
//! followed, which keeps span timestamps of one run consistent with each other.

#[derive(Clone, Copy, Debug)]
pub struct Clock {
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC, in ns.
    offset_ns: i128,
}

fn now_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer; both clocks always exist on Linux.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as i128 * 1_000_000_000 + ts.tv_nsec as i128
}

impl Clock {
    pub fn new() -> Self {
        // Read monotonic on both sides of realtime and use the midpoint to halve the error.
        let before = now_ns(libc::CLOCK_MONOTONIC);
        let real = now_ns(libc::CLOCK_REALTIME);
        let after = now_ns(libc::CLOCK_MONOTONIC);
        Self {
            offset_ns: real - (before + after) / 2,
        }
    }

    /// Monotonic ns now, on the kernel's clock.
    pub fn monotonic_now() -> u64 {
        now_ns(libc::CLOCK_MONOTONIC) as u64
    }

    /// Nanoseconds since the Unix epoch for a monotonic timestamp.
    pub fn unix_nanos(&self, mono_ns: u64) -> u64 {
        (mono_ns as i128 + self.offset_ns).max(0) as u64
    }

    /// `HH:MM:SS.micros` (UTC) for a monotonic timestamp.
    pub fn format_time(&self, mono_ns: u64) -> String {
        let unix = self.unix_nanos(mono_ns);
        let secs = unix / 1_000_000_000;
        let micros = (unix % 1_000_000_000) / 1000;
        let day = secs % 86_400;
        format!(
            "{:02}:{:02}:{:02}.{:06}",
            day / 3600,
            (day / 60) % 60,
            day % 60,
            micros
        )
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_now_to_wall_clock() {
        let clock = Clock::new();
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as i128;
        let converted = clock.unix_nanos(Clock::monotonic_now()) as i128;
        assert!(
            (converted - wall).abs() < 50_000_000,
            "{converted} vs {wall}"
        );
        assert_eq!(clock.format_time(0).len(), "00:00:00.000000".len());
    }
}
