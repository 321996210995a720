//! `sluicectl` against a real control plane and worker: the operator's path from a
//! spec file to READY, pause and resume with --wait, delete, history, and plain error
//! reports with the right exit codes.

use std::process::Output;

use anyhow::Result;
use serde_json::Value;
use sluice_e2e::*;

struct Ctl {
    server: String,
    token: String,
}

impl Ctl {
    /// sluicectl pointed at the deployment's control plane, with its operator token.
    fn of(d: &Deployment) -> Self {
        Self {
            server: format!(
                "http://{}",
                d.control_plane_addr.clone().unwrap_or_default()
            ),
            token: d.token.clone().unwrap_or_default(),
        }
    }

    async fn run(&self, args: &[&str]) -> Result<Output> {
        self.run_with(args, &[]).await
    }

    async fn run_with(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        Ok(tokio::process::Command::new(bin_path("sluicectl")?)
            .arg("--server")
            .arg(&self.server)
            .args(args)
            .env("SLUICE_TOKEN", &self.token)
            .envs(env.iter().copied())
            // No config file of the machine's user may leak into the test.
            .env("XDG_CONFIG_HOME", "/nonexistent")
            .output()
            .await?)
    }

    /// Runs a command that must succeed and returns its stdout.
    async fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.run(args).await?;
        assert!(
            out.status.success(),
            "sluicectl {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    }

    async fn json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        Ok(serde_json::from_str(&self.ok(&all).await?)?)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_workflow_through_sluicectl() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let ctl = Ctl::of(&d);

    let table = unique("cli");
    let spec_file = std::env::temp_dir().join(format!("{}.yaml", unique("spec")));
    std::fs::write(
        &spec_file,
        format!(
            "id: cli-orders\nspec:\n  source:\n    type: generator\n    config:\n      count: 1500\n      seed: 4\n      slice_size: 100\n      records_per_second: 1000\n  destination:\n    type: postgres\n    config:\n      url: {}\n      table: {table}\n",
            d.database_url
        ),
    )?;
    let out = ctl
        .run(&[
            "create",
            "-f",
            spec_file.to_str().unwrap_or_default(),
            "--wait",
            "-o",
            "json",
        ])
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let created: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(created["status"], "READY", "{created}");
    // While it backfills (1.5 s at 1000 records/s), the wait shows the run's progress.
    assert!(
        stderr.contains("phase BACKFILL")
            && stderr.contains("run 1 (initial): ")
            && stderr.contains(" written"),
        "{stderr}"
    );
    assert_eq!(d.row_count(&table).await?, 1500);

    let got = ctl.json(&["get", "cli-orders"]).await?;
    assert_eq!(got["phase"], "READY");
    assert_eq!(got["spec"]["source"]["config"]["count"], 1500);

    let paused = ctl.json(&["pause", "cli-orders", "--wait"]).await?;
    assert_eq!(paused["status"], "PAUSED");
    assert_eq!(paused["observed_generation"], paused["generation"]);
    let resumed = ctl.json(&["resume", "cli-orders", "--wait"]).await?;
    assert_eq!(resumed["status"], "READY");

    // describe: status, spec, the latest transitions and runs in one place.
    let described = ctl.ok(&["describe", "cli-orders", "--events", "2"]).await?;
    assert!(
        described.contains("Spec:")
            && described.contains("count: 1500")
            && described.contains("Latest 2 status transitions")
            && described.contains("PAUSED")
            && described.contains("initial")
            && described.contains("succeeded"),
        "{described}"
    );
    let described = ctl.json(&["describe", "cli-orders"]).await?;
    assert_eq!(described["pipeline"]["status"], "READY", "{described}");
    assert_eq!(described["spec"]["source"]["config"]["count"], 1500);
    assert_eq!(described["events"][0]["to_status"], "SETUP", "{described}");
    assert_eq!(described["runs"][0]["trigger"], "initial", "{described}");
    assert_eq!(described["runs"][0]["records_written"], 1500, "{described}");

    // Completion scripts need no server and are valid shell.
    let script = tokio::process::Command::new(bin_path("sluicectl")?)
        .args(["completion", "bash"])
        .env_remove("SLUICE_TOKEN")
        .output()
        .await?;
    assert!(script.status.success());
    let text = String::from_utf8(script.stdout)?;
    assert!(
        text.contains("describe") && text.contains("apply"),
        "{text}"
    );
    let path = std::env::temp_dir().join(format!("{}.bash", unique("completion")));
    std::fs::write(&path, &text)?;
    let checked = tokio::process::Command::new("bash")
        .arg("-n")
        .arg(&path)
        .status()
        .await?;
    assert!(checked.success(), "bash -n refused the completion script");

    let table_out = ctl.ok(&["list"]).await?;
    assert!(table_out.contains("cli-orders"), "{table_out}");

    // Errors: the gRPC code and reason, plainly, with exit code 1.
    let missing = ctl.run(&["get", "no-such-pipeline"]).await?;
    assert_eq!(missing.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("NOT_FOUND") && stderr.contains("PIPELINE_NOT_FOUND"),
        "{stderr}"
    );

    let bad = ctl
        .run(&[
            "create",
            "--id",
            "bad-one",
            "--source-type",
            "mysql",
            "--destination-type",
            "postgres",
        ])
        .await?;
    assert_eq!(bad.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("INVALID_ARGUMENT") && stderr.contains("pipeline.spec.source.type"),
        "{stderr}"
    );

    let usage = ctl.run(&["frobnicate"]).await?;
    assert_eq!(usage.status.code(), Some(64), "usage errors exit 64");

    ctl.ok(&["delete", "cli-orders", "--wait"]).await?;
    let gone = ctl.run(&["get", "cli-orders"]).await?;
    assert_eq!(gone.status.code(), Some(1));
    let history = ctl.json(&["history", "cli-orders"]).await?;
    let moves: Vec<&str> = history
        .as_array()
        .map(|events| {
            events
                .iter()
                .filter_map(|e| e["to_status"].as_str())
                .collect()
        })
        .unwrap_or_default();
    assert_eq!(
        moves,
        ["SETUP", "BACKFILL", "READY", "PAUSED", "READY", "TEARDOWN", "REMOVED"],
        "{history}"
    );

    let _ = std::fs::remove_file(&spec_file);
    d.shutdown().await
}

/// While an activity keeps failing, GetPipeline shows which one, how many attempts
/// failed, the last failure and when it runs next — and so does `sluicectl get`; the
/// report goes away once the activity succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retrying_activity_is_shown_by_get_and_sluicectl() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let ctl = Ctl::of(&d);
    // Nothing listens on port 1: setup fails with "connection refused", a transient
    // error, and keeps retrying.
    client
        .create_pipeline(generator_pipeline(
            "retrying",
            20,
            1,
            serde_json::json!({"url": "postgres://sluice:sluice@127.0.0.1:1/sluice", "table": "t"}),
            sluice_protocol::pb::DesiredStatus::Active,
        ))
        .await?;
    let pending = wait_for(
        "the failing setup to be reported",
        std::time::Duration::from_secs(60),
        || {
            let mut client = client.clone();
            async move {
                let p = get(&mut client, "retrying").await?;
                Ok(p.pending_activity.filter(|a| a.attempt >= 2))
            }
        },
    )
    .await?;
    assert_eq!(pending.name, "setup");
    assert_eq!(pending.failure_type, "transient_error");
    assert!(
        pending.last_failure.to_lowercase().contains("refused"),
        "{pending:?}"
    );
    let next = pending.next_attempt_time.unwrap_or_default();
    let last = pending.last_failure_time.unwrap_or_default();
    assert!(
        (next.seconds, next.nanos) >= (last.seconds, last.nanos),
        "{pending:?}"
    );
    let p = get(&mut client, "retrying").await?;
    assert_eq!(p.last_error, "", "a retrying activity is not an ERROR");

    let shown = ctl.ok(&["get", "retrying"]).await?;
    assert!(
        shown.contains("RETRYING") && shown.contains("setup, attempt"),
        "{shown}"
    );
    let json = ctl.json(&["get", "retrying"]).await?;
    assert_eq!(json["pending_activity"]["name"], "setup");

    // Fixed: the report is cleared.
    let table = unique("recovered");
    client
        .update_pipeline(set_destination("retrying", d.destination(&table, false)))
        .await?;
    let ready = wait_converged(
        &mut client,
        "retrying",
        sluice_protocol::pb::PipelineStatus::Ready,
        std::time::Duration::from_secs(90),
    )
    .await?;
    assert!(ready.pending_activity.is_none(), "{ready:?}");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_creates_and_updates_with_a_diff_and_dry_run_changes_nothing() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.start_control_plane().await?;
    let ctl = Ctl::of(&d);
    let doc = |id: &str, count: u32| {
        format!(
            "id: {id}\ndesired_status: PAUSED\nspec:\n  source:\n    type: generator\n    config:\n      count: {count}\n  destination:\n    type: postgres\n    config:\n      url: {}\n      table: {}_t\n",
            d.database_url,
            id.replace('-', "_")
        )
    };
    let write = |text: String| -> Result<String> {
        let path = std::env::temp_dir().join(format!("{}.yaml", unique("apply")));
        std::fs::write(&path, text)?;
        Ok(path.to_string_lossy().into_owned())
    };
    ctl.ok(&["create", "-f", &write(doc("ap-old", 10))?])
        .await?;

    // Dry run: the server checks both, the diff shows the change, nothing changes.
    let file = write(format!("{}---\n{}", doc("ap-old", 20), doc("ap-new", 5)))?;
    let dry = ctl.ok(&["apply", "-f", &file, "--dry-run"]).await?;
    assert!(
        dry.contains("pipeline/ap-old would be updated (generation 2)")
            && dry.contains("-       count: 10")
            && dry.contains("+       count: 20")
            && dry.contains("pipeline/ap-new would be created"),
        "{dry}"
    );
    let old = ctl.json(&["get", "ap-old"]).await?;
    assert_eq!(
        (
            old["generation"].as_i64(),
            &old["spec"]["source"]["config"]["count"]
        ),
        (Some(1), &Value::from(10))
    );
    let missing = ctl.run(&["get", "ap-new"]).await?;
    assert_eq!(
        missing.status.code(),
        Some(1),
        "the dry run created nothing"
    );

    // For real, then again: the second time nothing changes.
    let applied = ctl.json(&["apply", "-f", &file]).await?;
    assert_eq!(applied[0]["action"], "updated", "{applied}");
    assert_eq!(applied[0]["generation"], 2, "{applied}");
    assert_eq!(applied[1]["action"], "created", "{applied}");
    let old = ctl.json(&["get", "ap-old"]).await?;
    assert_eq!(old["spec"]["source"]["config"]["count"], 20);
    assert_eq!(
        ctl.json(&["get", "ap-new"]).await?["desired_status"],
        "PAUSED"
    );
    let again = ctl.ok(&["apply", "-f", &file]).await?;
    assert_eq!(
        again, "pipeline/ap-old unchanged\npipeline/ap-new unchanged\n",
        "{again}"
    );

    // A file with a bad document is refused whole before anything is sent.
    let bad = write(format!(
        "{}---\n{}",
        doc("ap-old", 30),
        doc("ap-x", 1).replace("id: ap-x\n", "")
    ))?;
    let refused = ctl.run(&["apply", "-f", &bad]).await?;
    assert_eq!(refused.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("document 2 has no id"), "{stderr}");
    assert_eq!(ctl.json(&["get", "ap-old"]).await?["generation"], 2);

    // A document the server refuses stops the run with its code; earlier ones stay.
    let invalid = write(format!(
        "{}---\n{}",
        doc("ap-new", 7),
        doc("ap-bad", 1).replace("type: generator", "type: mysql")
    ))?;
    let out = ctl.run(&["apply", "-f", &invalid]).await?;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("pipeline/ap-new updated"), "{stdout}");
    assert!(stderr.contains("INVALID_ARGUMENT"), "{stderr}");
    assert_eq!(ctl.run(&["get", "ap-bad"]).await?.status.code(), Some(1));
    d.shutdown().await
}

/// `sluicectl edit` with editors that are scripts: one changes the count, one saves
/// nothing, one breaks the YAML, and one edits a version someone changed meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_applies_the_saved_change_and_refuses_what_it_cannot() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let ctl = Ctl::of(&d);
    client
        .create_pipeline(generator_pipeline(
            "ed",
            2000,
            1,
            d.destination(&unique("ed"), false),
            sluice_protocol::pb::DesiredStatus::Paused,
        ))
        .await?;
    let dir = std::env::temp_dir().join(unique("edit"));
    std::fs::create_dir_all(&dir)?;
    let editor = |name: &str, body: &str| -> Result<String> {
        let path = dir.join(name);
        std::fs::write(&path, format!("#!/bin/sh\nset -e\n{body}\n"))?;
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
        Ok(path.display().to_string())
    };
    let generation = |v: &Value| v["generation"].as_i64().unwrap_or(-1);

    // Saved unchanged: nothing happens.
    let keep = editor("keep.sh", "true")?;
    let out = ctl
        .run_with(&["edit", "ed"], &[("SLUICE_EDITOR", &keep)])
        .await?;
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("edit cancelled"));
    assert_eq!(generation(&ctl.json(&["get", "ed"]).await?), 1);

    // A change: applied, with its diff; the password stays as it was.
    let change = editor("change.sh", r#"sed -i 's/count: 2000/count: 2500/' "$1""#)?;
    let out = ctl
        .run_with(&["edit", "ed"], &[("SLUICE_EDITOR", &change)])
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pipeline/ed updated (generation 2)")
            && stdout.contains("-       count: 2000")
            && stdout.contains("+       count: 2500"),
        "{stdout}"
    );
    let now = ctl.json(&["get", "ed"]).await?;
    assert_eq!(generation(&now), 2);
    assert_eq!(now["spec"]["source"]["config"]["count"], 2500);

    // Broken YAML: refused with exit status 64, the edit kept, nothing changed.
    let break_it = editor("break.sh", r#"printf 'spec: [\n' >> "$1""#)?;
    let out = ctl
        .run_with(&["edit", "ed"], &[("SLUICE_EDITOR", &break_it)])
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("your edit is kept in"), "{stderr}");
    assert_eq!(generation(&ctl.json(&["get", "ed"]).await?), 2);

    // Someone else changes the pipeline while the editor is open: ABORTED, nothing of
    // the edit applied.
    let sluicectl = bin_path("sluicectl")?.display().to_string();
    let racing = editor(
        "race.sh",
        &format!(
            r#"{sluicectl} --server {} resume ed > /dev/null
sed -i 's/count: 2500/count: 3000/' "$1""#,
            ctl.server
        ),
    )?;
    let out = ctl
        .run_with(&["edit", "ed"], &[("SLUICE_EDITOR", &racing)])
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("abort") || stderr.contains("etag"),
        "{stderr}"
    );
    let last = ctl.json(&["get", "ed"]).await?;
    assert_eq!(generation(&last), 3, "only the resume was applied");
    assert_eq!(last["spec"]["source"]["config"]["count"], 2500);
    d.shutdown().await
}
