//! The Python example (examples/python) against the real binaries: a client generated
//! from proto/ with grpcio-tools finds the API through reflection (v1alpha, as
//! grpcio-reflection asks) and drives a pipeline through create, READY, pause, resume
//! and delete.

use anyhow::Result;
use sluice_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_example_drives_a_pipeline_through_its_life() -> Result<()> {
    let mut d = Deployment::new().await?;
    d.start_control_plane().await?;
    d.start_worker("w1").await?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/python/run.sh");
    let out = tokio::process::Command::new(script)
        .args(["python-example", "1500"])
        .env(
            "SLUICE_SERVER",
            d.control_plane_addr.clone().unwrap_or_default(),
        )
        .env("SLUICE_TOKEN", d.token.clone().unwrap_or_default())
        .env("SLUICE_DESTINATION_URL", &d.database_url)
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("reflection lists") && stdout.contains("sluice.v1.PipelineService"),
        "{stdout}"
    );
    assert!(
        stdout.contains("history: -")
            && stdout.contains("READY>PAUSED")
            && stdout.contains("PAUSED>READY"),
        "{stdout}"
    );
    assert!(
        stdout.contains("done: created, READY, paused, resumed, deleted"),
        "{stdout}"
    );
    // The rows it wrote stay (the spec keeps the table on delete): all of them, once.
    assert_eq!(d.row_count("python_example").await?, 1500);
    assert!(
        get(&mut d.client().await?, "python-example").await.is_err(),
        "the pipeline is gone"
    );
    d.shutdown().await
}
