//! A small HTTP/1.1 client for connectors that read JSON APIs: one request per
//! connection (an API page is large next to a handshake), https verified against the
//! system's roots, the worker's host lists checked against the very addresses it
//! connects to, bounded bodies, and failures classified for the retry policy.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde_json::Value;
use sluice_protocol::message::FailureType;
use tokio::net::TcpStream;

use crate::{ActivityError, Context};

/// Largest response body read (a page of 100 API objects is far smaller).
const MAX_BODY: usize = 32 * 1024 * 1024;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A response: status and JSON body.
#[derive(Debug)]
pub struct JsonResponse {
    pub status: u16,
    pub body: Value,
}

fn tls_config() -> Result<Arc<rustls::ClientConfig>, ActivityError> {
    static CONFIG: OnceLock<Result<Arc<rustls::ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            for cert in found.certs {
                let _ = roots.add(cert);
            }
            if roots.is_empty() {
                return Err("no CA certificate found in the system's trust store".to_owned());
            }
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|b| Arc::new(b.with_root_certificates(roots).with_no_client_auth()))
                .map_err(|e| e.to_string())
        })
        .clone()
        .map_err(|e| ActivityError::transient(format!("https setup: {e}")))
}

/// GETs `url` with `headers` and parses the body as JSON (whatever the status: APIs
/// explain their errors in it).
pub async fn get_json(
    ctx: &Context,
    url: &url::Url,
    headers: &[(&str, String)],
) -> Result<JsonResponse, ActivityError> {
    let https = match url.scheme() {
        "https" => true,
        "http" => false,
        other => {
            return Err(ActivityError::config(format!(
                "scheme {other:?} is not http(s)"
            )))
        }
    };
    let host = url
        .host_str()
        .ok_or_else(|| ActivityError::config("the URL has no host"))?
        .to_owned();
    let bare = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    let port = url
        .port_or_known_default()
        .unwrap_or(if https { 443 } else { 80 });
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare.as_str(), port))
        .await
        .map_err(|e| ActivityError::transient(format!("cannot resolve {host}: {e}")))?
        .collect();
    let ips: Vec<IpAddr> = addrs.iter().map(SocketAddr::ip).collect();
    // Checked against the addresses connected to, so a name cannot resolve to an
    // allowed address for the check and another for the connection.
    ctx.hosts
        .check(&host, &ips)
        .map_err(ActivityError::config)?;
    let addr = *addrs
        .first()
        .ok_or_else(|| ActivityError::transient(format!("{host} resolves to no address")))?;
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| ActivityError::transient(format!("connecting to {host}:{port} timed out")))?
        .map_err(|e| ActivityError::transient(format!("cannot connect to {host}:{port}: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let mut path = url.path().to_owned();
    if let Some(q) = url.query() {
        path.push('?');
        path.push_str(q);
    }
    let mut request = hyper::Request::get(path).header(
        hyper::header::HOST,
        match url.port() {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        },
    );
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let request = request
        .header(hyper::header::USER_AGENT, "sluice")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ActivityError::config(format!("bad request: {e}")))?;
    let response = if https {
        let name = rustls::pki_types::ServerName::try_from(bare.clone())
            .map_err(|e| ActivityError::config(format!("{host}: {e}")))?;
        let tls = tokio_rustls::TlsConnector::from(tls_config()?)
            .connect(name, tcp)
            .await
            .map_err(|e| tls_error(&host, e))?;
        send(TokioIo::new(tls), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    let status = response.status().as_u16();
    let body = Limited::new(response.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|e| ActivityError::transient(format!("reading the response of {host}: {e}")))?
        .to_bytes();
    let body = serde_json::from_slice(&body).map_err(|e| {
        let failure_type = if status >= 500 {
            FailureType::TransientError
        } else {
            FailureType::SystemError
        };
        ActivityError::Failed {
            failure_type,
            message: format!("{host} answered {status} with a body that is not JSON: {e}"),
        }
    })?;
    Ok(JsonResponse { status, body })
}

async fn send<T>(
    io: TokioIo<T>,
    request: hyper::Request<Empty<Bytes>>,
) -> Result<hyper::Response<hyper::body::Incoming>, ActivityError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| ActivityError::transient(format!("http handshake: {e}")))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender
        .send_request(request)
        .await
        .map_err(|e| ActivityError::transient(format!("http request: {e}")))
}

/// A certificate the system's roots do not vouch for is a configuration problem;
/// anything else in the handshake may pass.
fn tls_error(host: &str, e: std::io::Error) -> ActivityError {
    let text = e.to_string();
    if text.contains("certificate") {
        ActivityError::config(format!("TLS with {host}: {text}"))
    } else {
        ActivityError::transient(format!("TLS with {host}: {text}"))
    }
}

/// The failure an API's error status stands for: 401/403 auth, other 4xx config
/// (the request is wrong and stays wrong), 429 and 5xx transient.
pub fn status_failure(status: u16) -> FailureType {
    match status {
        401 | 403 => FailureType::AuthError,
        408 | 409 | 425 | 429 => FailureType::TransientError,
        s if s >= 500 => FailureType::TransientError,
        _ => FailureType::ConfigError,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified_for_the_retry_policy() {
        assert_eq!(status_failure(401), FailureType::AuthError);
        assert_eq!(status_failure(404), FailureType::ConfigError);
        assert_eq!(status_failure(429), FailureType::TransientError);
        assert_eq!(status_failure(503), FailureType::TransientError);
    }
}
