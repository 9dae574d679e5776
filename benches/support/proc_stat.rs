//! What Linux's `/proc` says about a process, for the benchmarks.

use std::time::Duration;

/// User and system CPU time so far of `process`: a pid, or `self`.
pub fn cpu_time(process: &str) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{process}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Linux reports them in clock ticks of 1/100 s (USER_HZ).
    Duration::from_millis((ticks(11) + ticks(12)) * 10)
}
