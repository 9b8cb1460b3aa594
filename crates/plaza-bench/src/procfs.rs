//! CPU time and memory of a process, from `/proc/<pid>/stat` and `/proc/<pid>/status`.

use anyhow::{Context, Result, bail};
use serde::Serialize;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`). It is 100 on every Linux
/// architecture this runs on (x86, arm, arm64, riscv): the kernel fixes it in its user ABI.
pub const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct ProcSample {
    /// User + system CPU seconds of all the process's threads since it started.
    pub cpu_secs: f64,
    pub threads: u64,
    /// Resident set size now, in KiB.
    pub rss_kib: u64,
    /// Peak resident set size, in KiB.
    pub hwm_kib: u64,
}

/// `(utime + stime) in ticks, num_threads` from the text of `/proc/<pid>/stat`.
pub fn parse_stat(text: &str) -> Result<(u64, u64)> {
    // The command name (field 2) is in parentheses and may itself contain spaces and ')'.
    let close = text.rfind(')').context("no ')' in stat")?;
    let fields: Vec<&str> = text[close + 1..].split_ascii_whitespace().collect();
    // fields[0] is field 3 (state): field k is fields[k - 3].
    let get = |k: usize| -> Result<u64> {
        fields
            .get(k - 3)
            .with_context(|| format!("stat has no field {k}"))?
            .parse::<u64>()
            .with_context(|| format!("stat field {k} is not a number"))
    };
    Ok((get(14)? + get(15)?, get(20)?))
}

/// The value in KiB of a `Name:   1234 kB` line of `/proc/<pid>/status`.
pub fn parse_status_kib(text: &str, name: &str) -> Result<u64> {
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(name).and_then(|r| r.strip_prefix(':')) {
            let mut it = rest.split_ascii_whitespace();
            let value = it.next().context("empty status value")?;
            if it.next() != Some("kB") {
                bail!("{name} is not in kB");
            }
            return value
                .parse()
                .with_context(|| format!("{name} is not a number"));
        }
    }
    bail!("no {name} in status")
}

/// Reads the process `pid` now.
pub fn sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("reading /proc/{pid}/stat"))?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let (ticks, threads) = parse_stat(&stat)?;
    Ok(ProcSample {
        cpu_secs: ticks as f64 / CLOCK_TICKS_PER_SEC,
        threads,
        rss_kib: parse_status_kib(&status, "VmRSS")?,
        hwm_kib: parse_status_kib(&status, "VmHWM")?,
    })
}

/// Reads this process.
pub fn sample_self() -> Result<ProcSample> {
    sample(std::process::id())
}

/// CPU time of the whole machine, from the first line of `/proc/stat`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MachineSample {
    /// Seconds of CPU time spent on anything but idle and I/O wait, over all CPUs.
    pub busy_secs: f64,
    /// Online CPUs (the `cpuN` lines).
    pub cpus: u64,
}

/// Parses the text of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Result<MachineSample> {
    let mut lines = text.lines();
    let first = lines.next().context("empty /proc/stat")?;
    let mut fields = first.split_ascii_whitespace();
    if fields.next() != Some("cpu") {
        bail!("/proc/stat does not start with the cpu line");
    }
    let ticks: Vec<u64> = fields
        .map(|f| f.parse::<u64>().context("bad /proc/stat number"))
        .collect::<Result<_>>()?;
    if ticks.len() < 5 {
        bail!("/proc/stat cpu line too short");
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is already
    // counted in user.
    let total: u64 = ticks.iter().take(8).sum();
    let busy = total - ticks[3] - ticks[4];
    let cpus = lines
        .take_while(|l| l.starts_with("cpu"))
        .filter(|l| l[3..].starts_with(|c: char| c.is_ascii_digit()))
        .count() as u64;
    Ok(MachineSample {
        busy_secs: busy as f64 / CLOCK_TICKS_PER_SEC,
        cpus,
    })
}

/// Reads the machine now.
pub fn sample_machine() -> Result<MachineSample> {
    parse_proc_stat(&std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAT: &str = "4242 (pla za) (x)) S 1 4242 4242 0 -1 4194560 1500 0 0 0 \
                        250 75 0 0 20 0 3 0 123456 10000000 2500 18446744073709551615 1 1 0 0 0 0 0 \
                        0 0 0 0 0 17 1 0 0 0 0 0\n";

    const STATUS: &str = "Name:\tplaza\nUmask:\t0022\nState:\tS (sleeping)\nVmPeak:\t  200000 kB\n\
                          VmHWM:\t   12345 kB\nVmRSS:\t   10240 kB\nRssAnon:\t    8000 kB\nThreads:\t3\n";

    #[test]
    fn parses_stat() {
        assert_eq!(parse_stat(STAT).unwrap(), (325, 3));
        assert!(parse_stat("1 (x) S 1 2").is_err());
        assert!(parse_stat("no parens").is_err());
    }

    #[test]
    fn parses_status() {
        assert_eq!(parse_status_kib(STATUS, "VmRSS").unwrap(), 10240);
        assert_eq!(parse_status_kib(STATUS, "VmHWM").unwrap(), 12345);
        assert!(parse_status_kib(STATUS, "VmSwap").is_err());
        assert!(parse_status_kib(STATUS, "Threads").is_err());
    }

    #[test]
    fn parses_proc_stat() {
        let text = "cpu  100 5 50 1000 20 1 2 3 7 0\ncpu0 50 2 25 500 10 0 1 1 0 0\n\
                    cpu1 50 3 25 500 10 1 1 2 7 0\nintr 12345 0 0\nctxt 99\n";
        let m = parse_proc_stat(text).unwrap();
        assert_eq!(m.cpus, 2);
        assert!((m.busy_secs - 1.61).abs() < 1e-9, "{}", m.busy_secs);
        assert!(parse_proc_stat("intr 1\n").is_err());
        assert!(parse_proc_stat("cpu 1 2\n").is_err());
        let here = sample_machine().unwrap();
        assert!(here.cpus >= 1 && here.busy_secs > 0.0);
    }

    #[test]
    fn samples_self() {
        let s = sample_self().unwrap();
        assert!(s.rss_kib > 0 && s.hwm_kib >= s.rss_kib && s.threads >= 1);
    }
}
