//! Traces: the processes' `tracing` spans exported over OTLP (gRPC) when an endpoint is
//! configured, and the W3C trace context carried between them — in the gRPC call's
//! `traceparent` header, the outbox row, the Kafka signal's header — so that one trace
//! shows a call, its signal and the worker's work on it. Off unless an endpoint is set.

use std::fmt;

use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::TraceContextExt;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Exports spans while the process runs; flushes what is left when dropped.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    pub fn off() -> Self {
        Self { provider: None }
    }

    pub fn is_on(&self) -> bool {
        self.provider.is_some()
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            // Shutting down exports the last spans; it blocks, so not on a runtime thread.
            let _ = std::thread::spawn(move || provider.shutdown()).join();
        }
    }
}

/// The OTLP exporter runs its exports on the process's Tokio runtime: the SDK's batch
/// processor calls them from a thread of its own, where tonic would find no reactor.
struct OnRuntime {
    inner: opentelemetry_otlp::SpanExporter,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for OnRuntime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OnRuntime").finish_non_exhaustive()
    }
}

impl SpanExporter for OnRuntime {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let export = self.inner.export(batch);
        match tokio::runtime::Handle::try_current() {
            Ok(_) => export.await,
            Err(_) => self.runtime.block_on(export),
        }
    }

    fn shutdown_with_timeout(&self, timeout: std::time::Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &opentelemetry_sdk::Resource) {
        self.inner.set_resource(resource);
    }
}

/// A tracing layer that exports spans to `endpoint` (e.g. `http://collector:4317`) as
/// `service`, and the handle that flushes them at exit. Must run inside the runtime.
pub fn otlp_layer<S>(
    endpoint: &str,
    service: &'static str,
) -> Result<(impl tracing_subscriber::Layer<S>, Telemetry), String>
where
    S: tracing::Subscriber + for<'span> tracing_subscriber::registry::LookupSpan<'span>,
{
    let runtime = tokio::runtime::Handle::try_current()
        .map_err(|_| "traces need the async runtime to be running".to_owned())?;
    let inner = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(OnRuntime { inner, runtime })
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let tracer = provider.tracer("sluice");
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let layer = tracing_opentelemetry::layer().with_tracer(tracer);
    Ok((
        layer,
        Telemetry {
            provider: Some(provider),
        },
    ))
}

/// The W3C `traceparent` of `span`, if traces are on and the span is being recorded.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let context = span.context();
    let mut carrier = std::collections::HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// Makes the trace of `traceparent` (a W3C header value) the parent of `span`. A
/// missing or malformed value leaves the span where it is.
pub fn set_parent(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(value) = traceparent else {
        return;
    };
    let mut carrier = std::collections::HashMap::new();
    carrier.insert("traceparent".to_owned(), value.to_owned());
    let context = TraceContextPropagator::new().extract(&carrier);
    let _ = span.set_parent(context);
}

/// Records the trace id of `span` in its `trace_id` field (which the span must declare,
/// empty), so that log lines written inside it carry the id their trace has in the
/// collector. Nothing when traces are off.
pub fn record_trace_id(span: &tracing::Span) {
    let context = span.context();
    let trace_id = context.span().span_context().trace_id();
    if trace_id != opentelemetry::trace::TraceId::INVALID {
        span.record("trace_id", tracing::field::display(trace_id));
    }
}
