//! Configuration files of the real binaries: the file fills what the environment and
//! the flags leave, they win over it, and a wrong key stops the process with 64.

use std::time::Duration;

use anyhow::Result;
use sluice_e2e::*;
use sluice_protocol::pb::{DesiredStatus, PipelineStatus};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_file_fills_settings_and_the_environment_wins() -> Result<()> {
    let mut d = Deployment::new().await?;
    let mut client = d.start_control_plane().await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let path = std::env::temp_dir().join(format!("{}.toml", unique("worker")));
    // worker-id is also in the environment (the harness sets SLUICE_WORKER_ID=w1).
    std::fs::write(
        &path,
        format!("# a worker's settings\nmetrics-listen = \"127.0.0.1:{port}\"\nworker-id = \"from-file\"\n"),
    )?;
    d.start_worker_with(
        "w1",
        &[("SLUICE_CONFIG_FILE", path.to_str().unwrap_or_default())],
    )
    .await?;
    client
        .create_pipeline(generator_pipeline(
            "configured",
            100,
            1,
            d.destination(&unique("configured"), false),
            DesiredStatus::Active,
        ))
        .await?;
    let ready = wait_converged(
        &mut client,
        "configured",
        PipelineStatus::Ready,
        Duration::from_secs(90),
    )
    .await?;
    assert_eq!(ready.owner, "w1", "the environment wins over the file");
    // The file's metrics address took effect.
    let (_, body) = http_get(port, "/metrics").await?;
    assert!(body.contains("sluice_worker_pipelines_owned 1"), "{body}");

    // A key the binary does not have, or a bad value, stops it with 64, naming it.
    let typo = std::env::temp_dir().join(format!("{}.toml", unique("typo")));
    std::fs::write(&typo, "listen = \"127.0.0.1:0\"\nsignal-partitons = 3\n")?;
    let out = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .arg("--config")
        .arg(&typo)
        .env("DATABASE_URL", &d.database_url)
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("signal-partitons") && stderr.contains(typo.to_str().unwrap_or_default()),
        "{stderr}"
    );
    let bad = std::env::temp_dir().join(format!("{}.toml", unique("bad")));
    std::fs::write(&bad, "signal-partitions = 0\n")?;
    let out = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .env("SLUICE_CONFIG_FILE", &bad)
        .env("DATABASE_URL", &d.database_url)
        .env("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")
        .output()
        .await?;
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--signal-partitions"), "{stderr}");
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_config_files_name_only_settings_the_binaries_have() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for (binary, file) in [
        ("sluice-control-plane", "deploy/config/control-plane.toml"),
        ("sluice-worker", "deploy/config/worker.toml"),
    ] {
        // Every key, the commented ones too.
        let text = std::fs::read_to_string(root.join(file))?;
        let mut all = String::new();
        let mut keys = 0;
        for line in text.lines() {
            let uncommented = line.strip_prefix("# ").unwrap_or(line);
            if uncommented.split_once(" = ").is_some_and(|(k, _)| {
                !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '-')
            }) {
                all.push_str(uncommented);
                all.push('\n');
                keys += 1;
            }
        }
        assert!(keys >= 15, "{file}: only {keys} settings found");
        let path = std::env::temp_dir().join(format!("{}.toml", unique("example")));
        std::fs::write(&path, all)?;
        let out = tokio::process::Command::new(bin_path(binary)?)
            .arg("--config")
            .arg(&path)
            .arg("--help")
            .env_remove("SLUICE_CONFIG_FILE")
            .output()
            .await?;
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
