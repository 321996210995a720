//! deploy/ checked against the binaries, since no container engine runs here: the
//! Kubernetes manifests, the compose file and the Dockerfile name only flags and
//! environment variables the binaries have (as their --help shows them), their ports
//! and probes agree with the addresses the processes are told to listen on, and what
//! the probes ask for is served (gRPC health of "", /healthz, `migrate`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use serde_yaml::Value;
use sluice_e2e::*;

/// A workload's pod labels and its named container ports.
type Workload = (BTreeMap<String, String>, BTreeMap<String, u16>);

/// Environment variables the binaries read outside their flags.
const EXTRA_ENV: &[&str] = &["SLUICE_LOG"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The flags and environment variables `binary [subcommand] --help` documents.
#[derive(Debug, Default)]
struct Surface {
    flags: BTreeSet<String>,
    env: BTreeSet<String>,
}

async fn surface(binary: &str, subcommand: Option<&str>) -> Result<Surface> {
    let mut command = tokio::process::Command::new(bin_path(binary)?);
    if let Some(sub) = subcommand {
        command.arg(sub);
    }
    let out = command
        .arg("--help")
        .env_remove("SLUICE_CONFIG_FILE")
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "{binary} {subcommand:?} --help failed"
    );
    let text = String::from_utf8(out.stdout)?;
    let mut s = Surface::default();
    for word in text.split(|c: char| c.is_whitespace() || c == ',' || c == '[' || c == ']') {
        if let Some(flag) = word.strip_prefix("--") {
            let flag: String = flag
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            if !flag.is_empty() {
                s.flags.insert(flag);
            }
        }
    }
    for part in text.split("[env: ").skip(1) {
        let name: String = part
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        s.env.insert(name);
    }
    s.env.extend(EXTRA_ENV.iter().map(|e| (*e).to_owned()));
    Ok(s)
}

/// What a container runs: its binary and subcommand from `command`.
async fn surface_of(command: &[String]) -> Result<Surface> {
    let binary = command.first().context("a command")?;
    ensure!(
        ["sluice-control-plane", "sluice-worker", "sluicectl"].contains(&binary.as_str()),
        "unknown binary {binary:?}"
    );
    let sub = command
        .get(1)
        .filter(|a| !a.starts_with('-'))
        .map(String::as_str);
    // The control plane serves without a subcommand.
    let sub = match (binary.as_str(), sub) {
        ("sluice-control-plane", None) => Some("serve"),
        (_, sub) => sub,
    };
    let s = surface(binary, sub).await?;
    for arg in command.iter().skip(1) {
        if let Some(flag) = arg.strip_prefix("--") {
            let flag = flag.split('=').next().unwrap_or_default();
            ensure!(
                s.flags.contains(flag),
                "{command:?}: {binary} {} has no --{flag}",
                sub.unwrap_or_default()
            );
        }
    }
    Ok(s)
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn port_of(address: &str) -> Option<u16> {
    address.rsplit_once(':')?.1.parse().ok()
}

fn documents(path: &Path) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut value = <Value as serde::Deserialize>::deserialize(doc)
            .with_context(|| format!("{}: not YAML", path.display()))?;
        value.apply_merge()?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_manifests_use_only_what_the_binaries_have() -> Result<()> {
    let dir = root().join("deploy/kubernetes");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "yaml") {
            for doc in documents(&path)? {
                docs.push((path.clone(), doc));
            }
        }
    }
    ensure!(
        docs.len() >= 6,
        "expected the manifests, found {}",
        docs.len()
    );
    let kind = |d: &Value| d["kind"].as_str().unwrap_or_default().to_owned();
    let config_keys: BTreeSet<String> = docs
        .iter()
        .filter(|(_, d)| kind(d) == "ConfigMap")
        .flat_map(|(_, d)| {
            d["data"]
                .as_mapping()
                .map(|m| {
                    m.keys()
                        .filter_map(|k| k.as_str().map(str::to_owned))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .collect();
    ensure!(!config_keys.is_empty(), "no ConfigMap");

    // Pod labels and named ports of every workload, for Services and budgets.
    let mut workloads: Vec<Workload> = Vec::new();
    let mut containers_seen = 0;
    for (path, doc) in &docs {
        let k = kind(doc);
        if k != "Deployment" && k != "Job" {
            continue;
        }
        let pod = &doc["spec"]["template"];
        let labels: BTreeMap<String, String> =
            serde_yaml::from_value(pod["metadata"]["labels"].clone()).unwrap_or_default();
        if k == "Deployment" {
            let selector: BTreeMap<String, String> =
                serde_yaml::from_value(doc["spec"]["selector"]["matchLabels"].clone())?;
            ensure!(
                selector.iter().all(|(k, v)| labels.get(k) == Some(v)),
                "{}: selector does not match the pod labels",
                path.display()
            );
        }
        let mut named_ports = BTreeMap::new();
        for c in pod["spec"]["containers"]
            .as_sequence()
            .context("containers")?
        {
            containers_seen += 1;
            let name = c["name"].as_str().unwrap_or_default();
            let command = [strings(&c["command"]), strings(&c["args"])].concat();
            let s = surface_of(&command)
                .await
                .with_context(|| format!("{}: container {name}", path.display()))?;
            let mut listens = BTreeMap::new();
            for e in c["env"].as_sequence().cloned().unwrap_or_default() {
                let var = e["name"].as_str().unwrap_or_default().to_owned();
                ensure!(
                    s.env.contains(&var),
                    "{}: {name}: {var} is not an environment variable of {:?}",
                    path.display(),
                    command
                );
                if let Some(v) = e["value"].as_str() {
                    listens.insert(var, v.to_owned());
                }
            }
            if c["envFrom"].as_sequence().is_some_and(|s| !s.is_empty()) {
                for key in &config_keys {
                    ensure!(
                        s.env.contains(key),
                        "{}: {name}: the ConfigMap's {key} is not read by {:?}",
                        path.display(),
                        command
                    );
                }
            }
            let ports: BTreeMap<String, u16> = c["ports"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
                .iter()
                .filter_map(|p| {
                    Some((
                        p["name"].as_str()?.to_owned(),
                        u16::try_from(p["containerPort"].as_u64()?).ok()?,
                    ))
                })
                .collect();
            // Every port declared is one the process is told to listen on, and back.
            let mut told: BTreeSet<u16> = BTreeSet::new();
            for var in ["SLUICE_LISTEN", "SLUICE_METRICS_LISTEN"] {
                if let Some(port) = listens.get(var).and_then(|a| port_of(a)) {
                    told.insert(port);
                }
            }
            let declared: BTreeSet<u16> = ports.values().copied().collect();
            ensure!(
                told == declared,
                "{}: {name}: listens on {told:?} but declares ports {declared:?}",
                path.display()
            );
            let grpc_port = listens.get("SLUICE_LISTEN").and_then(|a| port_of(a));
            let metrics_port = listens
                .get("SLUICE_METRICS_LISTEN")
                .and_then(|a| port_of(a));
            for probe in ["readinessProbe", "livenessProbe", "startupProbe"] {
                let p = &c[probe];
                if p.is_null() {
                    continue;
                }
                if !p["grpc"].is_null() {
                    let port = p["grpc"]["port"]
                        .as_u64()
                        .and_then(|n| u16::try_from(n).ok());
                    ensure!(
                        port.is_some() && port == grpc_port,
                        "{}: {name}: {probe} asks gRPC health on {port:?}, the API is on {grpc_port:?}",
                        path.display()
                    );
                } else if !p["httpGet"].is_null() {
                    let port = match &p["httpGet"]["port"] {
                        Value::String(n) => ports.get(n).copied(),
                        v => v.as_u64().and_then(|n| u16::try_from(n).ok()),
                    };
                    let path_ = p["httpGet"]["path"].as_str().unwrap_or_default();
                    ensure!(
                        port.is_some() && port == metrics_port && ["/healthz", "/metrics"].contains(&path_),
                        "{}: {name}: {probe} asks {path_} on {port:?}; the metrics server is on {metrics_port:?}",
                        path.display()
                    );
                } else {
                    bail!(
                        "{}: {name}: {probe} is neither gRPC nor HTTP",
                        path.display()
                    );
                }
            }
            named_ports.extend(ports);
        }
        workloads.push((labels, named_ports));
    }
    ensure!(containers_seen >= 3, "only {containers_seen} containers");

    let selected = |selector: &Value| -> Result<&Workload> {
        let sel: BTreeMap<String, String> = serde_yaml::from_value(selector.clone())?;
        workloads
            .iter()
            .find(|(labels, _)| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
            .context("selects no workload")
    };
    for (path, doc) in &docs {
        match kind(doc).as_str() {
            "Service" => {
                let (_, ports) = selected(&doc["spec"]["selector"])
                    .with_context(|| format!("{}: Service", path.display()))?;
                for p in doc["spec"]["ports"].as_sequence().context("ports")? {
                    let target = p["targetPort"].as_str().unwrap_or_default();
                    ensure!(
                        ports.contains_key(target),
                        "{}: Service targets port {target:?}, the pods name {:?}",
                        path.display(),
                        ports.keys().collect::<Vec<_>>()
                    );
                }
            }
            "PodDisruptionBudget" => {
                selected(&doc["spec"]["selector"]["matchLabels"])
                    .with_context(|| format!("{}: PodDisruptionBudget", path.display()))?;
            }
            _ => {}
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_file_and_the_dockerfile_agree_with_the_binaries() -> Result<()> {
    let docs = documents(&root().join("deploy/compose/compose.yaml"))?;
    let compose = docs.first().context("compose.yaml")?;
    let services = compose["services"].as_mapping().context("services")?;
    let mut sluice_services = 0;
    for (name, service) in services {
        let name = name.as_str().unwrap_or_default();
        let command = strings(&service["command"]);
        if service["image"].as_str() != Some("sluice:dev") {
            continue;
        }
        sluice_services += 1;
        let s = surface_of(&command)
            .await
            .with_context(|| format!("compose service {name}"))?;
        let env: BTreeMap<String, String> =
            serde_yaml::from_value(service["environment"].clone()).unwrap_or_default();
        for var in env.keys() {
            ensure!(
                s.env.contains(var),
                "compose {name}: {var} is not read by {command:?}"
            );
        }
        let told: BTreeSet<u16> = ["SLUICE_LISTEN", "SLUICE_METRICS_LISTEN"]
            .iter()
            .filter_map(|v| env.get(*v).and_then(|a| port_of(a)))
            .collect();
        for mapping in strings(&service["ports"]) {
            let inner: u16 = mapping.rsplit(':').next().unwrap_or_default().parse()?;
            ensure!(
                told.contains(&inner),
                "compose {name}: publishes {inner}, but listens on {told:?}"
            );
        }
    }
    ensure!(
        sluice_services >= 6,
        "compose: {sluice_services} Sluice services"
    );
    let control_planes = services
        .iter()
        .filter(|(_, s)| strings(&s["command"]).get(1).map(String::as_str) == Some("serve"))
        .count();
    let workers = services
        .iter()
        .filter(|(_, s)| {
            strings(&s["command"]).first().map(String::as_str) == Some("sluice-worker")
        })
        .count();
    ensure!(
        (control_planes, workers) == (2, 3),
        "compose: {control_planes} control planes, {workers} workers"
    );

    // The Dockerfile copies the workspace's binaries and exposes every port used.
    let dockerfile = std::fs::read_to_string(root().join("deploy/container/Dockerfile"))?;
    for binary in ["sluice-control-plane", "sluice-worker", "sluicectl"] {
        bin_path(binary)?;
        ensure!(
            dockerfile.contains(&format!("target/release/{binary}")),
            "the Dockerfile does not ship {binary}"
        );
    }
    let exposed: BTreeSet<u16> = dockerfile
        .lines()
        .filter_map(|l| l.strip_prefix("EXPOSE "))
        .flat_map(|l| l.split_whitespace().filter_map(|p| p.parse().ok()))
        .collect();
    for port in [50051, 9464, 9465] {
        ensure!(
            exposed.contains(&port),
            "the Dockerfile does not expose {port}"
        );
    }
    ensure!(
        dockerfile.contains("ENTRYPOINT [\"sluice-control-plane\"]"),
        "the Dockerfile's entrypoint"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_probes_and_the_job_ask_for_is_served() -> Result<()> {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::{health_check_response::ServingStatus, HealthCheckRequest};

    let mut d = Deployment::new().await?;
    // migrate: the Job's command, against a fresh database, twice (it is idempotent).
    for _ in 0..2 {
        let out = tokio::process::Command::new(bin_path("sluice-control-plane")?)
            .args(["migrate", "--timeout", "30"])
            .env("DATABASE_URL", &d.database_url)
            .output()
            .await?;
        ensure!(
            out.status.success()
                && String::from_utf8_lossy(&out.stdout).contains("migrations applied"),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = tokio::process::Command::new(bin_path("sluice-control-plane")?)
        .args(["migrate", "--timeout", "1"])
        .env("DATABASE_URL", "postgres://nobody@127.0.0.1:1/none")
        .output()
        .await?;
    ensure!(
        out.status.code() == Some(1),
        "migrate against no database must fail"
    );

    // Kubernetes' gRPC probe asks for the service "".
    d.start_control_plane().await?;
    let url = format!(
        "http://{}",
        d.control_plane_addr.clone().unwrap_or_default()
    );
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    let status = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status;
    ensure!(
        status == ServingStatus::Serving as i32,
        "health of \"\": {status}"
    );

    // The worker's liveness probe: /healthz on the metrics port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    d.start_worker_with(
        "w1",
        &[("SLUICE_METRICS_LISTEN", &format!("127.0.0.1:{port}"))],
    )
    .await?;
    let (head, body) = http_get(port, "/healthz").await?;
    ensure!(
        head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
        "{head}"
    );
    ensure!(body == "ok\n", "{body}");
    d.shutdown().await
}
