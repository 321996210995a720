//! What a process costs, from /proc: threads, open files, resident memory.

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
