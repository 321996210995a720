//! One function per subcommand: build the request, call the control plane, optionally
//! wait, and return what to print on stdout.

use std::io::Read;
use std::path::Path;
use std::time::Duration;

use prost_types::FieldMask;
use sluice_protocol::auth::BearerToken;
use sluice_protocol::pb;
use sluice_protocol::pb::pipeline_service_client::PipelineServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::config::{self, Connection, Overrides};

use crate::apply;
use crate::args::{ApplyArgs, Cli, Command, CreateArgs, ListArgs, OutputFormat, WaitArgs};
use crate::error::CliError;
use crate::output;
use crate::spec_file::{self, CreateFlags, FileFormat, PipelineFile};
use crate::wait::{self, WaitTarget};

/// The server's own cap on page_size; asking for more is pointless.
const MAX_PAGE_SIZE: u64 = 1000;

pub type Client = PipelineServiceClient<InterceptedService<Channel, BearerToken>>;

/// Runs the parsed command and returns its stdout text.
pub async fn run(cli: Cli) -> Result<String, CliError> {
    let format = cli.output;
    // Read and validate local input before connecting, so a bad file is reported as
    // such even when the control plane is down.
    let create_plan = match &cli.command {
        Command::Create(args) => Some(plan_create(args)?),
        _ => None,
    };
    let apply_documents = match &cli.command {
        Command::Apply(args) => {
            let (text, origin, format) = read_text(&args.file)?;
            apply::parse_documents(&text, format, &origin)?
        }
        _ => Vec::new(),
    };
    let push_inputs = match &cli.command {
        Command::Push {
            input: Some(text), ..
        } => vec![parse_input(text, "--input")?],
        Command::Push {
            file: Some(path), ..
        } => read_inputs(path)?,
        _ => Vec::new(),
    };
    let connection = config::resolve(Overrides {
        config: cli.config.clone(),
        server: cli.server.clone(),
        token: std::env::var("SLUICE_TOKEN").ok(),
        ca_file: cli.ca_file.clone(),
        client_cert: cli.client_cert.clone(),
        client_key: cli.client_key.clone(),
    })?;
    refuse_plaintext_token(&connection, cli.insecure)?;
    let mut client = connect(&connection, cli.rpc_timeout()).await?;
    match cli.command {
        Command::Create(args) => {
            let plan = create_plan.expect("create plans are built above for create commands");
            create(&mut client, plan, args.wait, format).await
        }
        Command::Apply(args) => apply(&mut client, apply_documents, &args, format).await,
        Command::Edit { id } => edit(&mut client, id, format).await,
        Command::Get { id } => {
            let p = client
                .get_pipeline(pb::GetPipelineRequest { id })
                .await?
                .into_inner();
            Ok(output::render_pipeline(&p, format))
        }
        Command::List(args) => {
            let pipelines = list(&mut client, &args).await?;
            if args.ids {
                // Qualified by tenant, so that an admin's list (every tenant) names each
                // pipeline unambiguously; any token accepts its own tenant's that way.
                let ids: Vec<String> = pipelines
                    .iter()
                    .map(|p| match p.tenant.as_str() {
                        "" => p.id.clone(),
                        tenant => format!("{tenant}/{}", p.id),
                    })
                    .collect();
                return Ok(ids.join("\n"));
            }
            Ok(output::render_pipelines(&pipelines, format))
        }
        Command::Pause { id, wait } => {
            set_desired(&mut client, id, pb::DesiredStatus::Paused, wait, format).await
        }
        Command::Resume { id, wait } => {
            set_desired(&mut client, id, pb::DesiredStatus::Active, wait, format).await
        }
        Command::Delete { id, wait } => delete(&mut client, id, wait, format).await,
        Command::History { id } => {
            let events = all_events(&mut client, &id).await?;
            Ok(output::render_events(&events, format))
        }
        Command::Completion { .. } => Ok(String::new()),
        Command::Watch { ids, resume } => watch(&mut client, ids, resume, format).await,
        Command::Describe { id, events, runs } => {
            let pipeline = client
                .get_pipeline(pb::GetPipelineRequest { id: id.clone() })
                .await?
                .into_inner();
            let mut history = all_events(&mut client, &id).await?;
            let keep = history.len().saturating_sub(events as usize);
            history.drain(..keep);
            let runs = client
                .list_runs(pb::ListRunsRequest {
                    pipeline_id: id,
                    page_size: i32::try_from(runs).unwrap_or(i32::MAX),
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .runs;
            Ok(describe(&pipeline, &history, &runs, format))
        }
        Command::Connectors => {
            let connectors = client
                .list_connectors(pb::ListConnectorsRequest {})
                .await?
                .into_inner()
                .connectors;
            Ok(output::render_connectors(&connectors, format))
        }
        Command::Runs { id, limit } => {
            let runs = client
                .list_runs(pb::ListRunsRequest {
                    pipeline_id: id,
                    page_size: i32::try_from(limit).unwrap_or(i32::MAX),
                    page_token: String::new(),
                })
                .await?
                .into_inner()
                .runs;
            Ok(output::render_runs(&runs, format))
        }
        Command::Sync { id, request_id } => {
            let p = client
                .trigger_sync(pb::TriggerSyncRequest {
                    pipeline_id: id,
                    request_id: request_id.unwrap_or_default(),
                })
                .await?
                .into_inner();
            Ok(output::render_pipeline(&p, format))
        }
        Command::Push { id, .. } => {
            let total = push_inputs.len();
            let mut sequences = Vec::with_capacity(total);
            for input in push_inputs {
                let stored = client
                    .push_source_input(pb::PushSourceInputRequest {
                        pipeline_id: id.clone(),
                        input: Some(sluice_protocol::conversions::json_to_value(&input)),
                    })
                    .await;
                match stored {
                    Ok(stored) => sequences.push(stored.into_inner().sequence),
                    Err(status) => {
                        // What was stored stays stored: say how far the push got.
                        eprintln!(
                            "pushed {} of {total} inputs before input {} failed",
                            sequences.len(),
                            sequences.len() + 1
                        );
                        return Err(status.into());
                    }
                }
            }
            Ok(output::render_pushed(&id, &sequences, format))
        }
        Command::Reset { id, streams } => {
            let p = client
                .reset_pipeline(pb::ResetPipelineRequest {
                    pipeline_id: id,
                    streams,
                    etag: String::new(),
                })
                .await?
                .into_inner();
            Ok(output::render_pipeline(&p, format))
        }
    }
}

fn parse_input(text: &str, origin: &str) -> Result<serde_json::Value, CliError> {
    serde_json::from_str(text).map_err(|e| CliError::BadInput {
        origin: origin.to_owned(),
        message: format!("not valid JSON: {e}"),
    })
}

/// Reads JSON Lines inputs (blank lines skipped); "-" is standard input.
fn read_inputs(path: &Path) -> Result<Vec<serde_json::Value>, CliError> {
    let (text, origin) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| CliError::ReadSpec {
                origin: "standard input".into(),
                source,
            })?;
        (text, "<stdin>".to_owned())
    } else {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadSpec {
            origin: origin.clone(),
            source,
        })?;
        (text, origin)
    };
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(n, line)| parse_input(line, &format!("{origin}:{}", n + 1)))
        .collect()
}

/// A bearer token sent over plaintext is readable by anyone on the path; that is fine
/// only on this machine (loopback).
fn refuse_plaintext_token(connection: &Connection, insecure: bool) -> Result<(), CliError> {
    let url = normalise_server(&connection.server);
    if !url.starts_with("http://") {
        return Ok(());
    }
    // The host as a URL parser reads it: `http://localhost:1@evil.example` has user
    // info "localhost:1" and the host evil.example.
    let host = url::Url::parse(&url)
        .ok()
        .and_then(|u| u.host().map(|h| h.to_owned()));
    let loopback = match host {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    if loopback || insecure || connection.token.is_none() {
        return Ok(());
    }
    Err(CliError::Tls(format!(
        "refusing to send the token over plaintext {url}: use https:// (with --ca-file), \
         or pass --insecure"
    )))
}

/// "<tenant>/<id>": names the pipeline the server returned whatever the caller's tenant.
fn qualified(p: &pb::Pipeline) -> String {
    if p.tenant.is_empty() {
        p.id.clone()
    } else {
        format!("{}/{}", p.tenant, p.id)
    }
}

/// Accepts "host:port" as well as a URL, since operators rarely type the scheme.
pub fn normalise_server(url: &str) -> String {
    if url.contains("://") {
        url.to_owned()
    } else {
        format!("http://{url}")
    }
}

async fn connect(connection: &Connection, rpc_timeout: Duration) -> Result<Client, CliError> {
    let server = connection.server.as_str();
    let url = normalise_server(server);
    let mut endpoint = Endpoint::from_shared(url.clone())
        .map_err(|source| CliError::InvalidServer {
            url: server.to_owned(),
            source,
        })?
        .connect_timeout(rpc_timeout)
        .timeout(rpc_timeout);
    if url.starts_with("https://") {
        endpoint = endpoint
            .tls_config(tls_config(connection)?)
            .map_err(|e| CliError::Tls(e.to_string()))?;
    } else if connection.ca_file.is_some() || connection.client_cert.is_some() {
        return Err(CliError::Tls(format!(
            "a CA file or client certificate was given but the server URL {url} is not https://"
        )));
    }
    let token =
        BearerToken::new(connection.token.as_deref()).map_err(|e| CliError::ReadConfig {
            origin: "the token".into(),
            message: e.to_string(),
        })?;
    // Connecting eagerly turns "nothing listens there" into one clear message instead of
    // an UNAVAILABLE from whichever RPC happens to run first.
    let channel = endpoint
        .connect()
        .await
        .map_err(|source| CliError::Unreachable { url, source })?;
    Ok(PipelineServiceClient::with_interceptor(channel, token))
}

fn tls_config(connection: &Connection) -> Result<ClientTlsConfig, CliError> {
    let read = |path: &Path| {
        std::fs::read(path)
            .map_err(|e| CliError::Tls(format!("cannot read {}: {e}", path.display())))
    };
    let mut tls = ClientTlsConfig::new();
    tls = match &connection.ca_file {
        Some(ca) => tls.ca_certificate(Certificate::from_pem(read(ca)?)),
        // Without a CA file, the system's trust store decides.
        None => tls.with_native_roots(),
    };
    if let (Some(cert), Some(key)) = (&connection.client_cert, &connection.client_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(tls)
}

fn plan_create(args: &CreateArgs) -> Result<spec_file::CreatePlan, CliError> {
    let file = args.file.as_deref().map(read_spec_file).transpose()?;
    let flags = CreateFlags {
        id: args.id.clone(),
        paused: args.paused,
        source_type: args.source_type.clone(),
        source_config: args.source_config.clone(),
        destination_type: args.destination_type.clone(),
        destination_config: args.destination_config.clone(),
    };
    Ok(spec_file::build_create(file, flags)?)
}

fn read_spec_file(path: &Path) -> Result<PipelineFile, CliError> {
    let (text, origin, format) = read_text(path)?;
    Ok(spec_file::parse_file(&text, format, &origin)?)
}

/// A spec file's text, its name for messages and its format ("-": standard input).
fn read_text(path: &Path) -> Result<(String, String, FileFormat), CliError> {
    // The CLI runs a single task, so a blocking read here stalls nothing else.
    let (text, origin, format) = if path == Path::new("-") {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(|source| CliError::ReadSpec {
                origin: "standard input".into(),
                source,
            })?;
        (text, "<stdin>".to_owned(), FileFormat::Detect)
    } else {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CliError::ReadSpec {
            origin: origin.clone(),
            source,
        })?;
        (text, origin, FileFormat::from_path(path))
    };
    Ok((text, origin, format))
}

async fn watch(
    client: &mut Client,
    ids: Vec<String>,
    resume: Option<String>,
    format: OutputFormat,
) -> Result<String, CliError> {
    use std::io::Write;
    let mut stream = client
        .watch_pipelines(pb::WatchPipelinesRequest {
            resume_token: resume.unwrap_or_default(),
            pipeline_ids: ids,
        })
        .await?
        .into_inner();
    let mut stdout = std::io::stdout();
    if format == OutputFormat::Table {
        let _ = writeln!(
            stdout,
            "{:<9} {:<24} {:<10} {:<10} {:<9} {:<16} ERROR",
            "EVENT", "ID", "PHASE", "STATUS", "GEN", "OWNER"
        );
    }
    while let Some(event) = stream.message().await? {
        let kind = pb::WatchEventType::try_from(event.r#type)
            .map(|t| {
                t.as_str_name()
                    .trim_start_matches("WATCH_EVENT_TYPE_")
                    .to_owned()
            })
            .unwrap_or_else(|_| format!("UNKNOWN({})", event.r#type));
        let line = match format {
            OutputFormat::Json => serde_json::json!({
                "event": kind,
                "pipeline": event.pipeline.as_ref().map(output::PipelineView::from),
                "resume_token": event.resume_token,
            })
            .to_string(),
            OutputFormat::Table => match &event.pipeline {
                None => kind,
                Some(p) => {
                    let v = output::PipelineView::from(p);
                    format!(
                        "{:<9} {:<24} {:<10} {:<10} {:<9} {:<16} {}",
                        kind,
                        v.id,
                        v.phase,
                        v.status,
                        format!("{}/{}", v.observed_generation, v.generation),
                        if v.owner.is_empty() { "-" } else { &v.owner },
                        if v.last_error.is_empty() {
                            "-"
                        } else {
                            &v.last_error
                        },
                    )
                }
            },
        };
        // A closed pipe (`sluicectl watch | head`) ends the watch quietly.
        if writeln!(stdout, "{line}")
            .and_then(|()| stdout.flush())
            .is_err()
        {
            break;
        }
    }
    Ok(String::new())
}

/// Every status transition of a pipeline, page by page, oldest first.
async fn all_events(client: &mut Client, id: &str) -> Result<Vec<pb::PipelineEvent>, CliError> {
    let mut events = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_pipeline_events(pb::ListPipelineEventsRequest {
                pipeline_id: id.to_owned(),
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            return Ok(events);
        }
        if page.next_page_token == page_token {
            return Err(CliError::RepeatedPageToken(page.next_page_token));
        }
        page_token = page.next_page_token;
    }
}

fn describe(
    pipeline: &pb::Pipeline,
    events: &[pb::PipelineEvent],
    runs: &[pb::Run],
    format: OutputFormat,
) -> String {
    match format {
        OutputFormat::Json => {
            let parse =
                |text: String| serde_json::from_str::<serde_json::Value>(&text).unwrap_or_default();
            let all = serde_json::json!({
                "pipeline": parse(output::render_pipeline(pipeline, format)),
                "spec": apply::desired_view(pipeline)["spec"],
                "events": parse(output::render_events(events, format)),
                "runs": parse(output::render_runs(runs, format)),
            });
            serde_json::to_string_pretty(&all).unwrap_or_default()
        }
        OutputFormat::Table => {
            let mut out = output::render_pipeline(pipeline, format);
            out.push_str("\n\nSpec:\n");
            let view = apply::desired_view(pipeline);
            for line in apply::yaml_lines(&view["spec"]) {
                out.push_str("  ");
                out.push_str(&line);
                out.push('\n');
            }
            out.push_str(&format!("\nLatest {} status transitions:\n", events.len()));
            out.push_str(&output::render_events(events, format));
            out.push_str(&format!("\n\nLatest {} runs:\n", runs.len()));
            out.push_str(&output::render_runs(runs, format));
            out
        }
    }
}

/// What apply did with one document.
#[derive(Debug, serde::Serialize)]
struct Applied {
    id: String,
    /// created, updated, unchanged; "would be created"/"would be updated" in a dry run.
    action: String,
    generation: i64,
    diff: String,
}

async fn apply(
    client: &mut Client,
    documents: Vec<PipelineFile>,
    args: &ApplyArgs,
    format: OutputFormat,
) -> Result<String, CliError> {
    let mut done: Vec<Applied> = Vec::new();
    for doc in documents {
        match apply_one(client, doc, args.dry_run, None).await {
            Ok(applied) => {
                if format == OutputFormat::Table {
                    print!("{}", render_applied(&applied));
                }
                done.push(applied);
            }
            Err(err) => {
                // What was applied stays applied: show it before the error.
                if format == OutputFormat::Json {
                    println!(
                        "{}",
                        serde_json::to_string_pretty(&done).unwrap_or_default()
                    );
                }
                return Err(err);
            }
        }
    }
    Ok(match format {
        OutputFormat::Table => String::new(),
        OutputFormat::Json => serde_json::to_string_pretty(&done).unwrap_or_default(),
    })
}

/// `sluicectl edit ID`: the pipeline's desired state in an editor, applied on save.
async fn edit(client: &mut Client, id: String, format: OutputFormat) -> Result<String, CliError> {
    let current = client
        .get_pipeline(pb::GetPipelineRequest { id: id.clone() })
        .await?
        .into_inner();
    let mut doc = serde_json::Map::new();
    doc.insert("id".into(), serde_json::Value::String(id.clone()));
    if let serde_json::Value::Object(rest) = apply::desired_view(&current) {
        doc.extend(rest);
    }
    let original = format!(
        "# Edit pipeline {id}; save and quit to apply. Unchanged or empty: nothing happens.\n\
         # Secret values show as ******** and are kept unless you replace them.\n{}",
        serde_yaml::to_string(&serde_json::Value::Object(doc)).unwrap_or_default()
    );
    let safe: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let path =
        std::env::temp_dir().join(format!("sluicectl-edit-{safe}-{}.yaml", std::process::id()));
    let origin = path.display().to_string();
    let io = |e: std::io::Error| CliError::ReadSpec {
        origin: origin.clone(),
        source: e,
    };
    write_private(&path, &original).map_err(io)?;
    run_editor(&path)?;
    let edited = std::fs::read_to_string(&path).map_err(io)?;
    let content = edited
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .collect::<String>();
    if edited == original || content.trim().is_empty() {
        let _ = std::fs::remove_file(&path);
        return Ok("edit cancelled, no changes made\n".into());
    }
    // On any failure the edit stays on disk (the error keeps its own exit status).
    let kept = |e: CliError| {
        eprintln!("your edit is kept in {origin}: fix it and run `sluicectl apply -f {origin}`");
        e
    };
    let mut docs =
        apply::parse_documents(&edited, FileFormat::Yaml, &origin).map_err(|e| kept(e.into()))?;
    if docs.len() != 1 || docs[0].id.as_deref() != Some(id.as_str()) {
        return Err(kept(CliError::BadInput {
            origin: origin.clone(),
            message: format!(
                "the edit must stay one document with id {id} (to make another pipeline, use create or apply)"
            ),
        }));
    }
    let applied = apply_one(client, docs.remove(0), false, Some(&current.etag))
        .await
        .map_err(kept)?;
    let _ = std::fs::remove_file(&path);
    Ok(match format {
        OutputFormat::Table => render_applied(&applied),
        OutputFormat::Json => serde_json::to_string_pretty(&applied).unwrap_or_default(),
    })
}

/// Writes a file only its owner can read (it may hold a pipeline's config).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(text.as_bytes())
}

/// Runs the operator's editor on `path` and waits for it.
fn run_editor(path: &Path) -> Result<(), CliError> {
    let editor = ["SLUICE_EDITOR", "VISUAL", "EDITOR"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .unwrap_or_else(|| "vi".into());
    // Through the shell, so an editor with arguments (`code --wait`) works.
    let status = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{editor} \"$1\""))
        .arg("sluicectl-edit")
        .arg(path)
        .status()
        .map_err(|e| CliError::BadInput {
            origin: editor.clone(),
            message: format!("cannot start the editor: {e}"),
        })?;
    if !status.success() {
        return Err(CliError::BadInput {
            origin: editor,
            message: format!(
                "the editor exited with {status}; nothing was applied (the file is {})",
                path.display()
            ),
        });
    }
    Ok(())
}

fn render_applied(a: &Applied) -> String {
    let mut out = format!("pipeline/{} {}", a.id, a.action);
    if a.action != "unchanged" && a.generation > 0 {
        out.push_str(&format!(" (generation {})", a.generation));
    }
    out.push('\n');
    for line in a.diff.lines() {
        out.push_str("    ");
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// Applies one document. `etag`: the version the change was made against (edit);
/// otherwise the version read here.
async fn apply_one(
    client: &mut Client,
    doc: PipelineFile,
    dry_run: bool,
    etag: Option<&str>,
) -> Result<Applied, CliError> {
    let set_status = doc.desired_status.is_some();
    let plan = spec_file::build_create(Some(doc), CreateFlags::default())?;
    let id = plan.request.pipeline_id.clone();
    let current = match client
        .get_pipeline(pb::GetPipelineRequest { id: id.clone() })
        .await
    {
        Ok(p) => p.into_inner(),
        Err(status) if status.code() == tonic::Code::NotFound => {
            let created = client
                .create_pipeline(pb::CreatePipelineRequest {
                    validate_only: dry_run,
                    ..plan.request
                })
                .await?
                .into_inner();
            let diff = apply::diff(&[], &apply::yaml_lines(&apply::desired_view(&created)), 3);
            return Ok(Applied {
                id,
                action: if dry_run {
                    "would be created"
                } else {
                    "created"
                }
                .into(),
                generation: created.generation,
                diff: if dry_run { diff } else { String::new() },
            });
        }
        Err(status) => return Err(status.into()),
    };
    let mut pipeline = plan.request.pipeline.unwrap_or_default();
    pipeline.id = id.clone();
    // The change is made against what was shown: a concurrent writer makes it ABORTED.
    pipeline.etag = etag.map_or_else(|| current.etag.clone(), str::to_owned);
    let mut paths = vec!["spec".to_owned()];
    if set_status {
        paths.push("desired_status".into());
    }
    let request = pb::UpdatePipelineRequest {
        pipeline: Some(pipeline),
        update_mask: Some(prost_types::FieldMask { paths }),
        validate_only: true,
    };
    let would = client.update_pipeline(request.clone()).await?.into_inner();
    let mut diff = apply::diff(
        &apply::yaml_lines(&apply::desired_view(&current)),
        &apply::yaml_lines(&apply::desired_view(&would)),
        3,
    );
    if would.generation == current.generation {
        return Ok(Applied {
            id,
            action: "unchanged".into(),
            generation: current.generation,
            diff: String::new(),
        });
    }
    if diff.is_empty() {
        diff = "(only secret fields change; they are not shown)\n".into();
    }
    if dry_run {
        return Ok(Applied {
            id,
            action: "would be updated".into(),
            generation: would.generation,
            diff,
        });
    }
    let updated = client
        .update_pipeline(pb::UpdatePipelineRequest {
            validate_only: false,
            ..request
        })
        .await?
        .into_inner();
    Ok(Applied {
        id,
        action: "updated".into(),
        generation: updated.generation,
        diff,
    })
}

async fn create(
    client: &mut Client,
    plan: spec_file::CreatePlan,
    wait: WaitArgs,
    format: OutputFormat,
) -> Result<String, CliError> {
    let created = client.create_pipeline(plan.request).await?.into_inner();
    let target = if plan.paused {
        WaitTarget::Paused
    } else {
        WaitTarget::Ready
    };
    finish(client, created, target, wait, format).await
}

async fn set_desired(
    client: &mut Client,
    id: String,
    desired: pb::DesiredStatus,
    wait: WaitArgs,
    format: OutputFormat,
) -> Result<String, CliError> {
    let request = pb::UpdatePipelineRequest {
        pipeline: Some(pb::Pipeline {
            id,
            desired_status: desired as i32,
            ..Default::default()
        }),
        update_mask: Some(FieldMask {
            paths: vec!["desired_status".to_owned()],
        }),
        validate_only: false,
    };
    let updated = client.update_pipeline(request).await?.into_inner();
    let target = match desired {
        pb::DesiredStatus::Paused => WaitTarget::Paused,
        _ => WaitTarget::Ready,
    };
    finish(client, updated, target, wait, format).await
}

async fn delete(
    client: &mut Client,
    id: String,
    wait: WaitArgs,
    format: OutputFormat,
) -> Result<String, CliError> {
    let deleted = client
        .delete_pipeline(pb::DeletePipelineRequest {
            id,
            ..Default::default()
        })
        .await?
        .into_inner();
    let Some(timeout) = wait.timeout() else {
        return Ok(output::render_pipeline(&deleted, format));
    };
    match wait::wait_for(client, &qualified(&deleted), WaitTarget::Removed, timeout).await? {
        None => Ok(output::render_removed(&deleted.id, format)),
        // wait_for only returns a pipeline for targets other than Removed.
        Some(p) => Ok(output::render_pipeline(&p, format)),
    }
}

/// Prints the RPC's answer, or waits and prints the converged pipeline.
async fn finish(
    client: &mut Client,
    pipeline: pb::Pipeline,
    target: WaitTarget,
    wait: WaitArgs,
    format: OutputFormat,
) -> Result<String, CliError> {
    let Some(timeout) = wait.timeout() else {
        return Ok(output::render_pipeline(&pipeline, format));
    };
    let converged = wait::wait_for(client, &qualified(&pipeline), target, timeout)
        .await?
        .unwrap_or(pipeline);
    Ok(output::render_pipeline(&converged, format))
}

async fn list(client: &mut Client, args: &ListArgs) -> Result<Vec<pb::Pipeline>, CliError> {
    let mut pipelines = Vec::new();
    let mut page_token = String::new();
    loop {
        let page_size = next_page_size(args.page_size, args.limit, pipelines.len());
        let page = client
            .list_pipelines(pb::ListPipelinesRequest {
                page_size,
                page_token: page_token.clone(),
                status: args.status.iter().map(|s| s.to_pb() as i32).collect(),
                desired_status: args.desired.iter().map(|d| d.to_pb() as i32).collect(),
            })
            .await?
            .into_inner();
        pipelines.extend(
            page.pipelines
                .into_iter()
                .filter(|p| args.owner.is_empty() || args.owner.contains(&p.owner))
                .filter(|p| !args.unconverged || !converged(p)),
        );
        if let Some(limit) = args.limit {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            if pipelines.len() >= limit {
                pipelines.truncate(limit);
                break;
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        if page.next_page_token == page_token {
            return Err(CliError::RepeatedPageToken(page.next_page_token));
        }
        page_token = page.next_page_token;
    }
    Ok(pipelines)
}

/// Whether the owner has acted on the pipeline's latest change: it observed the current
/// generation, and the phase is a status (not UNASSIGNED, PENDING, PAUSING, ...).
fn converged(p: &pb::Pipeline) -> bool {
    p.observed_generation >= p.generation
        && !matches!(
            p.phase.as_str(),
            "UNASSIGNED" | "PENDING" | "PAUSING" | "RESUMING" | "DELETING"
        )
}

/// The page size to request: never more than still wanted under --limit, so a small
/// limit does not fetch a full default page; 0 lets the server pick its default.
fn next_page_size(page_size: Option<u32>, limit: Option<u64>, fetched: usize) -> i32 {
    let remaining = limit.map(|l| l.saturating_sub(fetched as u64).clamp(1, MAX_PAGE_SIZE));
    let size = match (page_size.map(u64::from), remaining) {
        (Some(p), Some(r)) => p.min(r),
        (Some(p), None) => p,
        (None, Some(r)) => r,
        (None, None) => 0,
    };
    // Both inputs are bounded by MAX_PAGE_SIZE, far below i32::MAX.
    i32::try_from(size).unwrap_or(i32::MAX)
}

#[cfg(test)]
mod plaintext_tests {
    use super::*;

    fn conn(server: &str, token: Option<&str>) -> Connection {
        Connection {
            server: server.into(),
            token: token.map(Into::into),
            ca_file: None,
            client_cert: None,
            client_key: None,
        }
    }

    #[test]
    fn tokens_go_over_plaintext_only_to_loopback() {
        for ok in [
            "127.0.0.1:50051",
            "http://localhost:1",
            "http://[::1]:5",
            "https://cp:1",
        ] {
            assert!(
                refuse_plaintext_token(&conn(ok, Some("t")), false).is_ok(),
                "{ok}"
            );
        }
        assert!(
            refuse_plaintext_token(&conn("http://cp.internal:50051", Some("t")), false).is_err()
        );
        // User info that looks like a loopback host does not make the host one.
        for sneaky in [
            "http://localhost:1@evil.example",
            "http://127.0.0.1@evil.example:50051",
            "http://[::1]@evil.example/",
            "http://localhost.evil.example:1",
        ] {
            assert!(
                refuse_plaintext_token(&conn(sneaky, Some("t")), false).is_err(),
                "{sneaky}"
            );
        }
        assert!(refuse_plaintext_token(&conn("10.0.0.5:50051", Some("t")), false).is_err());
        assert!(refuse_plaintext_token(&conn("10.0.0.5:50051", Some("t")), true).is_ok());
        assert!(refuse_plaintext_token(&conn("10.0.0.5:50051", None), false).is_ok());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_size_respects_limit() {
        assert_eq!(next_page_size(None, None, 0), 0);
        assert_eq!(next_page_size(Some(100), None, 500), 100);
        assert_eq!(next_page_size(None, Some(20), 0), 20);
        assert_eq!(next_page_size(None, Some(20), 15), 5);
        assert_eq!(next_page_size(Some(10), Some(20), 15), 5);
        assert_eq!(next_page_size(None, Some(5000), 0), 1000);
    }

    #[test]
    fn converged_means_the_owner_acted_on_the_latest_change() {
        let p = |generation, observed, phase: &str| pb::Pipeline {
            generation,
            observed_generation: observed,
            phase: phase.into(),
            ..Default::default()
        };
        assert!(converged(&p(3, 3, "READY")));
        assert!(converged(&p(3, 3, "BACKFILL")));
        assert!(converged(&p(3, 3, "PAUSED")));
        assert!(!converged(&p(3, 2, "READY")));
        for phase in ["UNASSIGNED", "PENDING", "PAUSING", "RESUMING", "DELETING"] {
            assert!(!converged(&p(3, 3, phase)), "{phase}");
        }
    }

    #[test]
    fn server_without_scheme_gets_http() {
        assert_eq!(normalise_server("cp:50051"), "http://cp:50051");
        assert_eq!(normalise_server("https://cp:443"), "https://cp:443");
    }
}
