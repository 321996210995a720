//! Traces of the real binaries, received by an OTLP collector inside the test: an
//! UpdatePipeline call that carries a W3C traceparent yields one trace that goes from
//! the control plane (the call, the signal relay) into the worker (the pass that acted
//! on the signal, down to the activity that persisted PAUSED).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use sluice_e2e::*;
use sluice_protocol::pb::{DesiredStatus, PipelineStatus};

const CONVERGE: Duration = Duration::from_secs(90);

#[derive(Debug, Clone)]
struct ReceivedSpan {
    service: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    name: String,
}

#[derive(Default, Clone)]
struct Collector {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut received = self.spans.lock().expect("not poisoned");
        for resource_spans in request.into_inner().resource_spans {
            let service = resource_spans
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .and_then(|v| match v {
                    AnyValue::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for scope in resource_spans.scope_spans {
                for span in scope.spans {
                    received.push(ReceivedSpan {
                        service: service.clone(),
                        trace_id: span.trace_id,
                        span_id: span.span_id,
                        parent_span_id: span.parent_span_id,
                        name: span.name,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_spans_the_call_the_signal_and_the_worker() -> Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let mut d = Deployment::new().await?;
    d.control_plane_args = vec![
        "--otlp-endpoint".into(),
        endpoint.clone(),
        "--log-format".into(),
        "json".into(),
    ];
    let mut client = d.start_control_plane().await?;
    d.start_worker_with(
        "w1",
        &[
            ("SLUICE_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_BSP_SCHEDULE_DELAY", "200"),
            ("SLUICE_LOG_FORMAT", "json"),
        ],
    )
    .await?;
    client
        .create_pipeline(generator_pipeline(
            "traced",
            200,
            3,
            d.destination(&unique("traced"), false),
            DesiredStatus::Active,
        ))
        .await?;
    wait_converged(&mut client, "traced", PipelineStatus::Ready, CONVERGE).await?;

    // The caller starts the trace.
    let trace_id = &uuid::Uuid::new_v4().simple().to_string();
    let mut pause = tonic::Request::new(set_desired("traced", DesiredStatus::Paused));
    pause.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01").parse()?,
    );
    client.update_pipeline(pause).await?;
    wait_converged(&mut client, "traced", PipelineStatus::Paused, CONVERGE).await?;

    // The control plane exports every 5 s (the SDK's default), the worker sooner.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let trace = loop {
        let trace: Vec<ReceivedSpan> = collector
            .spans
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|s| hex(&s.trace_id) == *trace_id)
            .cloned()
            .collect();
        let has = |service: &str, name: &str| {
            trace.iter().any(|s| s.service == service && s.name == name)
        };
        if has("sluice-control-plane", "PipelineService/UpdatePipeline")
            && has("sluice-control-plane", "relay signal")
            && has("sluice-worker", "reconcile")
            && has("sluice-worker", "update-status")
        {
            break trace;
        }
        if tokio::time::Instant::now() > deadline {
            let names: Vec<String> = trace
                .iter()
                .map(|s| format!("{}:{}", s.service, s.name))
                .collect();
            bail!("trace {trace_id} is missing spans; it has {names:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    // The chain: call → relay → the worker's pass → the activity that wrote PAUSED.
    let span = |service: &str, name: &str| {
        trace
            .iter()
            .find(|s| s.service == service && s.name == name)
            .cloned()
            .expect("present")
    };
    let call = span("sluice-control-plane", "PipelineService/UpdatePipeline");
    let relay = span("sluice-control-plane", "relay signal");
    assert_eq!(
        hex(&call.parent_span_id),
        "00f067aa0ba902b7",
        "the call continues the caller's span"
    );
    assert_eq!(
        relay.parent_span_id, call.span_id,
        "the relay continues the call"
    );
    let passes: Vec<&ReceivedSpan> = trace
        .iter()
        .filter(|s| s.service == "sluice-worker" && s.name == "reconcile")
        .collect();
    assert!(
        passes.iter().all(|p| p.parent_span_id == relay.span_id),
        "the worker's pass continues the signal"
    );
    assert!(
        trace
            .iter()
            .any(|s| s.name == "update-status"
                && passes.iter().any(|p| p.span_id == s.parent_span_id)),
        "the status write is a child of the pass"
    );

    // Log lines written inside the trace carry its id, in both processes.
    for (process, message) in [
        ("control-plane", "pipeline updated"),
        ("w1", "status changed"),
    ] {
        let log = std::fs::read_to_string(d.log_dir.join(format!("{process}.log")))?;
        let tagged = log.lines().any(|line| {
            line.contains(message) && line.contains(&format!("\"trace_id\":\"{trace_id}\""))
        });
        assert!(
            tagged,
            "no {message:?} line of {process} carries trace_id {trace_id}:\n{log}"
        );
    }
    server.abort();
    d.shutdown().await
}
