//! What a process costs, from /proc: threads, open files, resident memory, CPU.

use std::time::Duration;

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    pub threads: usize,
    pub files: usize,
    pub rss_kb: u64,
}

fn status_field<'a>(status: &'a str, field: &str) -> Result<&'a str> {
    Ok(status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .with_context(|| format!("{field} line"))?
        .trim())
}

pub fn cost(pid: u32) -> Result<Cost> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    Ok(Cost {
        threads: status_field(&status, "Threads:")?.parse()?,
        files: std::fs::read_dir(format!("/proc/{pid}/fd"))?.count(),
        rss_kb: status_field(&status, "VmRSS:")?
            .trim_end_matches("kB")
            .trim()
            .parse()?,
    })
}

/// CPU time the process has used (user and system), in seconds.
pub fn cpu_seconds(pid: u32) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from the third on.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .context("stat line")?
        .1
        .split_whitespace()
        .collect();
    let ticks: f64 = fields.get(11).context("utime")?.parse::<f64>()?
        + fields.get(12).context("stime")?.parse::<f64>()?;
    Ok(ticks / clock_ticks_per_second())
}

/// The kernel's clock ticks per second (`getconf CLK_TCK`; 100 on Linux if unknown).
fn clock_ticks_per_second() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// The share of one core the process uses over `window`.
pub async fn cpu_share(pid: u32, window: Duration) -> Result<f64> {
    let before = cpu_seconds(pid)?;
    tokio::time::sleep(window).await;
    Ok((cpu_seconds(pid)? - before) / window.as_secs_f64())
}

/// The cost once threads and open files stop moving for longer than the runtime keeps
/// an idle blocking thread (10 s): closed Kafka clients and finished work take a few
/// seconds to go.
pub async fn settled(pid: u32) -> Result<Cost> {
    let mut last = cost(pid)?;
    let mut same = 0;
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = cost(pid)?;
        same = if (now.threads, now.files) == (last.threads, last.files) {
            same + 1
        } else {
            0
        };
        last = now;
        if same >= 12 {
            break;
        }
    }
    Ok(last)
}

/// The process's threads by name, e.g. for a failure message.
pub fn thread_names(pid: u32) -> String {
    let mut names = std::collections::BTreeMap::<String, usize>::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        *names.entry(name.trim().to_owned()).or_default() += 1;
    }
    format!("{names:?}")
}
