//! `--wait`: poll GetPipeline until the worker has acted on the change. Convergence is
//! judged Kubernetes-style — the worker must have observed the current generation, not
//! just report a matching status left over from before the change.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use sluice_protocol::pb;
use tokio::time::Instant;
use tonic::Code;

use crate::commands::Client;
use crate::output::{desired_status_name, status_name};

/// How often GetPipeline is polled; fast enough to feel immediate, cheap for the server.
pub const POLL_INTERVAL: Duration = Duration::from_millis(200);

/// What a wait is waiting for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitTarget {
    /// desired ACTIVE, worker reports READY.
    Ready,
    /// desired PAUSED, worker reports PAUSED.
    Paused,
    /// The pipeline has been torn down and its row removed.
    Removed,
}

impl WaitTarget {
    fn desired(self) -> pb::DesiredStatus {
        match self {
            Self::Ready => pb::DesiredStatus::Active,
            Self::Paused => pb::DesiredStatus::Paused,
            Self::Removed => pb::DesiredStatus::Deleted,
        }
    }

    fn describe(self) -> &'static str {
        match self {
            Self::Ready => "become READY",
            Self::Paused => "become PAUSED",
            Self::Removed => "be removed",
        }
    }
}

/// The verdict on one observation of the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Converged,
    Pending,
    /// The worker acted on the current generation and failed.
    Failed {
        last_error: String,
    },
    /// Someone else changed desired_status while we waited; ours will never be reached.
    Superseded {
        desired_status: String,
    },
}

/// Judges one GetPipeline answer against the target. Removal is signalled by NOT_FOUND,
/// never by a pipeline, so a visible pipeline is at best pending for `Removed`.
pub fn evaluate(target: WaitTarget, p: &pb::Pipeline) -> Verdict {
    if p.desired_status != target.desired() as i32 {
        return Verdict::Superseded {
            desired_status: desired_status_name(p.desired_status),
        };
    }
    let observed = p.observed_generation >= p.generation;
    let status = pb::PipelineStatus::try_from(p.status).unwrap_or_default();
    match (target, status) {
        (_, pb::PipelineStatus::Error) if observed => Verdict::Failed {
            last_error: p.last_error.clone(),
        },
        (WaitTarget::Ready, pb::PipelineStatus::Ready)
        | (WaitTarget::Paused, pb::PipelineStatus::Paused)
            if observed =>
        {
            Verdict::Converged
        }
        _ => Verdict::Pending,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WaitError {
    #[error("timed out after {}s waiting for pipeline {id} to {}{}", .timeout.as_secs(), .target.describe(), last_seen(.last))]
    Timeout {
        id: String,
        target: WaitTarget,
        timeout: Duration,
        last: Option<Box<pb::Pipeline>>,
    },
    #[error("pipeline {id} failed: {}", or_unknown(.last_error))]
    Failed { id: String, last_error: String },
    #[error("pipeline {id} was changed to {desired_status} by someone else while waiting")]
    Superseded { id: String, desired_status: String },
    #[error("pipeline {id} disappeared while waiting for it to {}", .target.describe())]
    Vanished { id: String, target: WaitTarget },
    #[error(transparent)]
    Rpc(#[from] tonic::Status),
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "no error message reported"
    } else {
        s
    }
}

fn last_seen(p: &Option<Box<pb::Pipeline>>) -> String {
    p.as_deref()
        .map(|p| format!(" (last seen: {})", progress_line(p)))
        .unwrap_or_default()
}

/// One-line summary used by the spinner, the log lines and timeout messages.
pub fn progress_line(p: &pb::Pipeline) -> String {
    format!(
        "phase {}, status {}, generation {}, observed {}",
        if p.phase.is_empty() { "-" } else { &p.phase },
        status_name(p.status),
        p.generation,
        p.observed_generation
    )
}

/// Progress on stderr: a spinner for people at a terminal, one line per phase change for
/// logs (a spinner's redraws would be noise in a CI log).
enum Progress {
    Spinner(ProgressBar),
    Lines {
        last_phase: Option<String>,
        /// When the last backfill line was logged (one every 10 s at most).
        last_run_line: Option<Instant>,
    },
}

/// What the run in progress has done, shown while a pipeline backfills or syncs.
#[derive(Debug, Default)]
struct RunProgress {
    /// (records written, when) at the previous sample, for the rate.
    previous: Option<(i64, Instant)>,
}

impl RunProgress {
    /// "run 1 (initial): 120000 read, 95000 written, 23000/s" for the newest running run.
    async fn line(&mut self, client: &mut Client, id: &str) -> Option<String> {
        let runs = client
            .list_runs(pb::ListRunsRequest {
                pipeline_id: id.to_owned(),
                page_size: 1,
                page_token: String::new(),
            })
            .await
            .ok()?
            .into_inner()
            .runs;
        let run = runs.first().filter(|r| r.outcome == "running")?;
        let now = Instant::now();
        let rate = match self.previous {
            Some((written, at)) if now > at && run.records_written >= written => {
                let per_second = (run.records_written - written) as f64 / (now - at).as_secs_f64();
                format!(", {per_second:.0}/s")
            }
            _ => String::new(),
        };
        self.previous = Some((run.records_written, now));
        Some(format!(
            "run {} ({}): {} read, {} written{rate}",
            run.number, run.trigger, run.records_read, run.records_written
        ))
    }
}

impl Progress {
    fn new(id: &str, target: WaitTarget) -> Self {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new_spinner();
            // The template is a constant; it only fails if its syntax is wrong.
            let style = ProgressStyle::with_template("{spinner} {prefix} {msg} [{elapsed}]")
                .expect("spinner template is valid");
            bar.set_style(style);
            bar.set_prefix(format!("waiting for {id} to {}:", target.describe()));
            bar.enable_steady_tick(Duration::from_millis(100));
            Self::Spinner(bar)
        } else {
            Self::Lines {
                last_phase: None,
                last_run_line: None,
            }
        }
    }

    fn observe(&mut self, id: &str, p: &pb::Pipeline, run: Option<&str>) {
        match self {
            Self::Spinner(bar) => match run {
                Some(run) => bar.set_message(format!("{}; {run}", progress_line(p))),
                None => bar.set_message(progress_line(p)),
            },
            Self::Lines {
                last_phase,
                last_run_line,
            } => {
                if last_phase.as_deref() != Some(p.phase.as_str()) {
                    *last_phase = Some(p.phase.clone());
                    log_line(&format!("pipeline {id}: {}", progress_line(p)));
                }
                if let Some(run) = run {
                    let due =
                        last_run_line.is_none_or(|at| at.elapsed() >= Duration::from_secs(10));
                    if due {
                        *last_run_line = Some(Instant::now());
                        log_line(&format!("pipeline {id}: {run}"));
                    }
                }
            }
        }
    }

    fn note(&mut self, message: &str) {
        match self {
            Self::Spinner(bar) => bar.set_message(message.to_owned()),
            Self::Lines { .. } => log_line(message),
        }
    }

    fn finish(self) {
        if let Self::Spinner(bar) = self {
            bar.finish_and_clear();
        }
    }
}

fn log_line(line: &str) {
    // Progress is best effort: a closed stderr must not fail the command.
    let _ = writeln!(std::io::stderr().lock(), "{line}");
}

/// Polls until the target is reached. Returns the final pipeline, or None once removed.
pub async fn wait_for(
    client: &mut Client,
    id: &str,
    target: WaitTarget,
    timeout: Duration,
) -> Result<Option<pb::Pipeline>, WaitError> {
    let mut progress = Progress::new(id, target);
    let result = poll(client, id, target, timeout, &mut progress).await;
    progress.finish();
    result
}

async fn poll(
    client: &mut Client,
    id: &str,
    target: WaitTarget,
    timeout: Duration,
    progress: &mut Progress,
) -> Result<Option<pb::Pipeline>, WaitError> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<pb::Pipeline> = None;
    let mut unavailable_noted = false;
    let mut runs = RunProgress::default();
    loop {
        let request = pb::GetPipelineRequest { id: id.to_owned() };
        match client.get_pipeline(request).await {
            Ok(response) => {
                let pipeline = response.into_inner();
                // Records moved so far, while there is a backfill to watch.
                let run = if pipeline.status == pb::PipelineStatus::Backfill as i32 {
                    runs.line(client, id).await
                } else {
                    None
                };
                progress.observe(id, &pipeline, run.as_deref());
                match evaluate(target, &pipeline) {
                    Verdict::Converged => return Ok(Some(pipeline)),
                    Verdict::Pending => {}
                    Verdict::Failed { last_error } => {
                        return Err(WaitError::Failed {
                            id: id.to_owned(),
                            last_error,
                        })
                    }
                    Verdict::Superseded { desired_status } => {
                        return Err(WaitError::Superseded {
                            id: id.to_owned(),
                            desired_status,
                        })
                    }
                }
                last = Some(pipeline);
                unavailable_noted = false;
            }
            Err(status) if status.code() == Code::NotFound => {
                return match target {
                    WaitTarget::Removed => Ok(None),
                    _ => Err(WaitError::Vanished {
                        id: id.to_owned(),
                        target,
                    }),
                };
            }
            // A control plane restarting mid-wait is not a failed change; keep polling
            // until the deadline, and say so once.
            Err(status) if matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded) => {
                if !unavailable_noted {
                    unavailable_noted = true;
                    progress.note(&format!(
                        "control plane unavailable ({}), retrying",
                        status.message()
                    ));
                }
            }
            Err(status) => return Err(status.into()),
        }
        if Instant::now() + POLL_INTERVAL > deadline {
            return Err(WaitError::Timeout {
                id: id.to_owned(),
                target,
                timeout,
                last: last.map(Box::new),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pipeline(
        desired: pb::DesiredStatus,
        status: pb::PipelineStatus,
        gen: i64,
        observed: i64,
    ) -> pb::Pipeline {
        pb::Pipeline {
            id: "p".into(),
            desired_status: desired as i32,
            status: status as i32,
            generation: gen,
            observed_generation: observed,
            last_error: "boom".into(),
            ..Default::default()
        }
    }

    #[test]
    fn verdict_table() {
        use pb::DesiredStatus as D;
        use pb::PipelineStatus as S;
        use WaitTarget::*;
        let failed = Verdict::Failed {
            last_error: "boom".into(),
        };
        let cases = [
            // A matching status for an old generation is not convergence.
            (Ready, D::Active, S::Ready, 2, 1, Verdict::Pending),
            (Ready, D::Active, S::Ready, 2, 2, Verdict::Converged),
            (Ready, D::Active, S::Ready, 2, 3, Verdict::Converged),
            (Ready, D::Active, S::Backfill, 2, 2, Verdict::Pending),
            (Ready, D::Active, S::Unspecified, 1, 0, Verdict::Pending),
            (Paused, D::Paused, S::Paused, 4, 4, Verdict::Converged),
            (Paused, D::Paused, S::Ready, 4, 3, Verdict::Pending),
            (Paused, D::Paused, S::Paused, 4, 3, Verdict::Pending),
            // ERROR only ends the wait once the worker has seen the current generation;
            // an older ERROR may be what the change is meant to fix.
            (Ready, D::Active, S::Error, 3, 2, Verdict::Pending),
            (Ready, D::Active, S::Error, 3, 3, failed.clone()),
            (Paused, D::Paused, S::Error, 3, 3, failed.clone()),
            (Removed, D::Deleted, S::Teardown, 5, 5, Verdict::Pending),
            (Removed, D::Deleted, S::Error, 5, 5, failed),
            (
                Paused,
                D::Active,
                S::Ready,
                5,
                5,
                Verdict::Superseded {
                    desired_status: "ACTIVE".into(),
                },
            ),
            (
                Ready,
                D::Deleted,
                S::Teardown,
                5,
                4,
                Verdict::Superseded {
                    desired_status: "DELETED".into(),
                },
            ),
        ];
        for (target, desired, status, gen, observed, want) in cases {
            let p = pipeline(desired, status, gen, observed);
            assert_eq!(
                evaluate(target, &p),
                want,
                "{target:?} {desired:?} {status:?} gen {gen} observed {observed}"
            );
        }
    }

    #[test]
    fn timeout_message_names_the_last_state() {
        let mut p = pipeline(pb::DesiredStatus::Paused, pb::PipelineStatus::Ready, 2, 1);
        p.phase = "PAUSING".into();
        let err = WaitError::Timeout {
            id: "p".into(),
            target: WaitTarget::Paused,
            timeout: Duration::from_secs(300),
            last: Some(Box::new(p)),
        };
        assert_eq!(
            err.to_string(),
            "timed out after 300s waiting for pipeline p to become PAUSED \
             (last seen: phase PAUSING, status READY, generation 2, observed 1)"
        );
        let err = WaitError::Failed {
            id: "p".into(),
            last_error: String::new(),
        };
        assert_eq!(
            err.to_string(),
            "pipeline p failed: no error message reported"
        );
    }
}
