//! gRPC over TLS and mutual TLS: the control plane serves the certificate it is given,
//! refuses plaintext, and with a client CA refuses clients without a certificate;
//! sluicectl connects with --ca-file (and --client-cert/--client-key).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use sluice_e2e::audit::check_rows;
use sluice_e2e::*;
use sluice_protocol::auth::BearerToken;
use sluice_protocol::pb;
use sluice_protocol::pb::pipeline_service_client::PipelineServiceClient;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Pki {
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
}

/// A CA, a server certificate for 127.0.0.1/localhost and a client certificate.
fn make_pki(dir: &Path) -> Result<Pki> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "sluice test CA");
    let ca = ca_params.self_signed(&ca_key)?;
    let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(names)?;
        params.distinguished_name.push(DnType::CommonName, cn);
        let cert = params.signed_by(&key, &ca, &ca_key)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(
        vec!["127.0.0.1".into(), "localhost".into()],
        "control plane",
    )?;
    let (client_pem, client_key) = leaf(vec!["sluicectl".into()], "operator")?;
    let write = |name: &str, text: &str| -> Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    };
    Ok(Pki {
        ca: write("ca.pem", &ca.pem())?,
        server_cert: write("server.pem", &server_pem)?,
        server_key: write("server.key", &server_key)?,
        client_cert: write("client.pem", &client_pem)?,
        client_key: write("client.key", &client_key)?,
    })
}

async fn list_over(channel: Channel, token: &str) -> Result<usize, tonic::Status> {
    let mut client = PipelineServiceClient::with_interceptor(
        channel,
        BearerToken::new(Some(token)).expect("ascii"),
    );
    Ok(client
        .list_pipelines(pb::ListPipelinesRequest::default())
        .await?
        .into_inner()
        .pipelines
        .len())
}

async fn sluicectl(args: &[&str], token: &str) -> Result<std::process::Output> {
    Ok(tokio::process::Command::new(bin_path("sluicectl")?)
        .args(args)
        .env("SLUICE_TOKEN", token)
        .env("XDG_CONFIG_HOME", "/nonexistent")
        .output()
        .await?)
}

/// A deployment whose control plane serves TLS (mutual: clients need a certificate);
/// returns it with its PKI, address and operator token.
async fn tls_control_plane(mutual: bool) -> Result<(Deployment, Pki, String, String)> {
    let mut d = Deployment::new().await?;
    let pki = make_pki(&d.log_dir)?;
    let mut args = vec![
        "--tls-cert".to_owned(),
        pki.server_cert.display().to_string(),
        "--tls-key".to_owned(),
        pki.server_key.display().to_string(),
    ];
    if mutual {
        args.extend(["--tls-client-ca".to_owned(), pki.ca.display().to_string()]);
    }
    d.control_plane_args = args;
    let addr = d.start_control_plane_process().await?;
    let token = d.token.clone().unwrap_or_default();
    Ok((d, pki, addr, token))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_the_given_certificate_and_refuses_plaintext() -> Result<()> {
    let (d, pki, addr, token) = tls_control_plane(false).await?;
    let ca = Certificate::from_pem(std::fs::read(&pki.ca)?);

    let tls = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(ca))?
        .connect()
        .await?;
    assert_eq!(list_over(tls, &token).await?, 0);

    // Plaintext gRPC gets nowhere.
    let plain = Channel::from_shared(format!("http://{addr}"))?;
    let refused = match plain.connect().await {
        Err(_) => true,
        Ok(channel) => list_over(channel, &token).await.is_err(),
    };
    assert!(refused, "plaintext must not reach a TLS listener");

    // sluicectl: with the CA it works; without it the server's certificate is untrusted.
    let server = format!("https://{addr}");
    let ca_path = pki.ca.display().to_string();
    let ok = sluicectl(
        &["--server", &server, "--ca-file", &ca_path, "list"],
        &token,
    )
    .await?;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let untrusted = sluicectl(&["--server", &server, "list"], &token).await?;
    assert_eq!(untrusted.status.code(), Some(1));
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_needs_a_client_certificate() -> Result<()> {
    let (d, pki, addr, token) = tls_control_plane(true).await?;
    let ca_pem = std::fs::read(&pki.ca)?;

    let with_cert = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca_pem))
                .identity(Identity::from_pem(
                    std::fs::read(&pki.client_cert)?,
                    std::fs::read(&pki.client_key)?,
                )),
        )?
        .connect()
        .await?;
    assert_eq!(list_over(with_cert, &token).await?, 0);

    let without_cert = Channel::from_shared(format!("https://{addr}"))?
        .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca_pem)))?;
    let refused = match without_cert.connect().await {
        Err(_) => true,
        Ok(channel) => list_over(channel, &token).await.is_err(),
    };
    assert!(refused, "a client without a certificate must be refused");

    let server = format!("https://{addr}");
    let ca = pki.ca.display().to_string();
    let cert = pki.client_cert.display().to_string();
    let key = pki.client_key.display().to_string();
    let ok = sluicectl(
        &[
            "--server",
            &server,
            "--ca-file",
            &ca,
            "--client-cert",
            &cert,
            "--client-key",
            &key,
            "list",
        ],
        &token,
    )
    .await?;
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let no_cert = sluicectl(&["--server", &server, "--ca-file", &ca, "list"], &token).await?;
    assert_eq!(no_cert.status.code(), Some(1));
    d.shutdown().await
}

/// `url` with extra query parameters.
fn with_params(url: &str, params: &str) -> String {
    let sep = if url.contains('?') { '&' } else { '?' };
    format!("{url}{sep}{params}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_verify_the_servers_certificate() -> Result<()> {
    let mut d = Deployment::new().await?;
    let Some(ca) = d.infra.local_ca.clone() else {
        // Only deploy/local/up.sh's PostgreSQL has a certificate this test knows.
        eprintln!("SKIPPED: PostgreSQL is not the local one (no SLUICE_LOCAL_CA)");
        return d.shutdown().await;
    };
    let verified = with_params(
        &d.database_url,
        &format!("sslmode=verify-full&sslrootcert={ca}"),
    );
    // Control plane and worker reach their database over verified TLS (their own
    // operator-given CA file)...
    d.process_database_url = Some(verified.clone());
    let mut client = d.start_control_plane().await?;
    // ... and so do destinations, whose specs name a CA only by its file name in the
    // worker's CA directory, or carry it inline.
    let ca_dir = d.log_dir.join("destination-cas");
    std::fs::create_dir_all(&ca_dir)?;
    std::fs::copy(&ca, ca_dir.join("local-ca.pem"))?;
    let other_dir = d.log_dir.join("other-pki");
    std::fs::create_dir_all(&other_dir)?;
    let other_ca = make_pki(&other_dir)?.ca;
    std::fs::copy(&other_ca, ca_dir.join("other-ca.pem"))?;
    d.start_worker_with(
        "w1",
        &[(
            "SLUICE_DESTINATION_CA_DIR",
            ca_dir.to_str().context("utf-8 path")?,
        )],
    )
    .await?;
    let by_name = with_params(
        &d.database_url,
        "sslmode=verify-full&sslrootcert=local-ca.pem",
    );
    let inline = with_params(&d.database_url, "sslmode=verify-full");
    let ca_pem = std::fs::read_to_string(&ca)?;
    for (id, table, destination) in [
        (
            "over-tls",
            "tls_t",
            serde_json::json!({"url": by_name, "table": "tls_t"}),
        ),
        (
            "inline-ca",
            "tls_inline",
            serde_json::json!({"url": inline, "table": "tls_inline", "ssl_ca_pem": ca_pem}),
        ),
    ] {
        client
            .create_pipeline(generator_pipeline(
                id,
                50,
                1,
                destination,
                pb::DesiredStatus::Active,
            ))
            .await?;
        wait_converged(
            &mut client,
            id,
            pb::PipelineStatus::Ready,
            std::time::Duration::from_secs(90),
        )
        .await?;
        assert_eq!(d.row_count(table).await?, 50);
    }
    let plain: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND NOT s.ssl \
           AND a.backend_type = 'client backend'",
    )
    .fetch_one(&d.pool)
    .await?;
    assert_eq!(plain, 0, "every Sluice connection uses TLS");

    // A certificate that does not chain to the given CA is refused.
    let untrusted = with_params(
        &d.database_url,
        "sslmode=verify-full&sslrootcert=other-ca.pem",
    );
    client
        .create_pipeline(generator_pipeline(
            "untrusted",
            5,
            1,
            serde_json::json!({"url": untrusted, "table": "tls_untrusted"}),
            pb::DesiredStatus::Active,
        ))
        .await?;
    let failed = wait_for(
        "untrusted goes to ERROR",
        std::time::Duration::from_secs(90),
        || {
            let mut client = client.clone();
            async move {
                let p = get(&mut client, "untrusted").await?;
                Ok((p.status == pb::PipelineStatus::Error as i32).then_some(p))
            }
        },
    )
    .await?;
    assert!(!failed.last_error.is_empty());
    assert!(!d.table_exists("tls_untrusted").await?);
    d.shutdown().await
}

/// Creates a generator pipeline into `table`, waits for READY and checks every row
/// arrived exactly (count and checksum).
async fn assert_pipeline_lands(
    d: &Deployment,
    client: &mut Client,
    id: &str,
    count: u64,
    seed: u64,
    table: &str,
) -> Result<()> {
    client
        .create_pipeline(generator_pipeline(
            id,
            count,
            seed,
            d.destination(table, false),
            pb::DesiredStatus::Active,
        ))
        .await?;
    wait_converged(
        client,
        id,
        pb::PipelineStatus::Ready,
        std::time::Duration::from_secs(90),
    )
    .await?;
    check_rows(&d.pool, table, seed, count).await?;
    Ok(())
}

/// A librdkafka properties file for SASL/PLAIN over TLS as user "sluice".
fn sasl_properties(path: &Path, password: &str, ca: &str) -> Result<PathBuf> {
    std::fs::write(
        path,
        format!(
            "# SASL/PLAIN over TLS\nsecurity.protocol=SASL_SSL\nsasl.mechanism=PLAIN\n\
             sasl.username=sluice\nsasl.password={password}\nssl.ca.location={ca}\n"
        ),
    )?;
    Ok(path.to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_clients_use_tls_through_kafka_properties() -> Result<()> {
    let mut d = Deployment::new().await?;
    let (Some(ca), Some(ssl_listener)) = (d.infra.local_ca.clone(), d.infra.kafka_ssl.clone())
    else {
        eprintln!("SKIPPED: Kafka is not the local one (no SLUICE_LOCAL_KAFKA_SSL)");
        return d.shutdown().await;
    };
    // Control plane and worker reach Kafka only through its TLS listener, verifying the
    // broker's certificate against the local CA.
    d.process_kafka = Some((
        ssl_listener,
        vec![
            ("security.protocol".into(), "SSL".into()),
            ("ssl.ca.location".into(), ca),
            (
                "ssl.endpoint.identification.algorithm".into(),
                "https".into(),
            ),
        ],
    ));
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    assert_pipeline_lands(&d, &mut client, "kafka-tls", 200, 4, "kafka_tls_t").await?;
    d.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_sasl_credentials_come_from_a_properties_file_and_stay_out_of_logs() -> Result<()> {
    let mut d = Deployment::new().await?;
    let (Some(ca), Some((sasl_listener, password_file))) =
        (d.infra.local_ca.clone(), d.infra.kafka_sasl.clone())
    else {
        eprintln!("SKIPPED: Kafka is not the local one (no SLUICE_LOCAL_KAFKA_SASL)");
        return d.shutdown().await;
    };
    let password = std::fs::read_to_string(&password_file)?.trim().to_owned();
    d.kafka_properties_file = Some(sasl_properties(
        &d.log_dir.join("kafka.properties"),
        &password,
        &ca,
    )?);
    d.process_kafka = Some((sasl_listener.clone(), Vec::new()));
    let mut client = d.start_control_plane().await?;
    d.start_worker("w1").await?;
    assert_pipeline_lands(&d, &mut client, "kafka-sasl", 100, 5, "kafka_sasl_t").await?;
    assert!(
        !d.logs()?.contains(&password),
        "the SASL password was logged"
    );

    // A wrong password is refused by the broker: the control plane cannot start.
    let mut wrong = Deployment::new().await?;
    wrong.kafka_properties_file = Some(sasl_properties(
        &wrong.log_dir.join("kafka.properties"),
        "e2e-secret-wrong",
        &ca,
    )?);
    wrong.process_kafka = Some((sasl_listener, Vec::new()));
    let started = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        wrong.start_control_plane_process(),
    )
    .await;
    assert!(
        !matches!(started, Ok(Ok(_))),
        "a control plane with a wrong SASL password must not come up"
    );
    d.shutdown().await?;
    wrong.shutdown().await
}
