//! The control plane's Prometheus metrics (served with `--metrics-listen`): gRPC calls
//! by method and code with their latency, and the outbox relay's signals. The same
//! layer opens each call's trace span.

use std::sync::{Arc, LazyLock};
use std::task::{Context, Poll};
use std::time::Instant;

use futures::future::BoxFuture;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::{Family, MetricConstructor};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use sluice_infra::metrics::{latency_buckets, Labels};

#[derive(Clone)]
pub struct LatencyBuckets;

impl MetricConstructor<Histogram> for LatencyBuckets {
    fn new_metric(&self) -> Histogram {
        Histogram::new(latency_buckets())
    }
}

pub struct ApiMetrics {
    pub registry: Arc<Registry>,
    pub requests: Family<Labels, Counter>,
    pub request_seconds: Family<Labels, Histogram, LatencyBuckets>,
    pub signals_sent: Counter,
    pub signals_deferred: Counter,
    /// Outbox row committed → Kafka acknowledged, per signal.
    pub signal_relay_seconds: Histogram,
}

pub static API: LazyLock<ApiMetrics> = LazyLock::new(|| {
    let requests = Family::<Labels, Counter>::default();
    let request_seconds = Family::new_with_constructor(LatencyBuckets);
    let signals_sent = Counter::default();
    let signals_deferred = Counter::default();
    let signal_relay_seconds = Histogram::new(latency_buckets());
    let mut registry = Registry::default();
    registry.register(
        "sluice_grpc_requests",
        "gRPC calls answered, by method and status code",
        requests.clone(),
    );
    registry.register(
        "sluice_grpc_request_seconds",
        "gRPC call latency (request received → response headers), by method",
        request_seconds.clone(),
    );
    registry.register(
        "sluice_signals_sent",
        "Signals the outbox relay published to Kafka",
        signals_sent.clone(),
    );
    registry.register(
        "sluice_signals_deferred",
        "Signal sends Kafka did not acknowledge (retried later)",
        signals_deferred.clone(),
    );
    registry.register(
        "sluice_signal_relay_seconds",
        "Outbox row committed → signal acknowledged by Kafka",
        signal_relay_seconds.clone(),
    );
    ApiMetrics {
        registry: Arc::new(registry),
        requests,
        request_seconds,
        signals_sent,
        signals_deferred,
        signal_relay_seconds,
    }
});

/// Counts every gRPC call of the services it wraps by method and code.
#[derive(Debug, Clone, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, ResBody> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<ResBody>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        // "/sluice.v1.PipelineService/GetPipeline" → "PipelineService/GetPipeline"; a
        // path that is no method served here is "unknown", so that no caller can make
        // up series without end.
        let path = request.uri().path();
        let method = if SERVED_METHODS.contains(path) {
            path.trim_start_matches('/')
                .rsplit_once('.')
                .map_or(path, |(_, m)| m)
                .to_owned()
        } else {
            "unknown".to_owned()
        };
        let started = Instant::now();
        // One span per call, continuing the caller's trace (W3C traceparent header).
        let span = tracing::info_span!(
            "rpc",
            otel.name = %method,
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.method = %method,
            trace_id = tracing::field::Empty,
        );
        sluice_infra::telemetry::set_parent(
            &span,
            request
                .headers()
                .get("traceparent")
                .and_then(|v| v.to_str().ok()),
        );
        sluice_infra::telemetry::record_trace_id(&span);
        let future = tracing::Instrument::instrument(self.inner.call(request), span);
        Box::pin(async move {
            let response = future.await?;
            // A unary error is a trailers-only response: its code is in the headers.
            // A response without one carries OK (in its trailers).
            let code = response
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or(tonic::Code::Ok, tonic::Code::from);
            API.requests
                .get_or_create(&vec![
                    ("method", method.clone()),
                    ("code", format!("{code:?}")),
                ])
                .inc();
            API.request_seconds
                .get_or_create(&vec![("method", method)])
                .observe(started.elapsed().as_secs_f64());
            Ok(response)
        })
    }
}

/// The paths of every method the control plane serves: the API's, from its descriptors,
/// and those of the health and reflection services.
static SERVED_METHODS: LazyLock<std::collections::HashSet<String>> = LazyLock::new(|| {
    let mut paths: std::collections::HashSet<String> = [
        "/grpc.health.v1.Health/Check",
        "/grpc.health.v1.Health/Watch",
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    let descriptors = <prost_types::FileDescriptorSet as prost::Message>::decode(
        sluice_protocol::pb::FILE_DESCRIPTOR_SET,
    )
    .unwrap_or_default();
    for file in descriptors.file {
        let package = file.package.unwrap_or_default();
        for service in file.service {
            let service_name = service.name.unwrap_or_default();
            for method in service.method {
                paths.insert(format!(
                    "/{package}.{service_name}/{}",
                    method.name.unwrap_or_default()
                ));
            }
        }
    }
    paths
});

#[cfg(test)]
mod tests {
    #[test]
    fn every_api_method_is_known_and_nothing_else() {
        let served = &*super::SERVED_METHODS;
        assert!(served.contains("/sluice.v1.PipelineService/WatchPipelines"));
        assert!(served.contains("/sluice.v1.PipelineService/GetPipeline"));
        assert!(!served.contains("/sluice.v1.PipelineService/Bogus"));
        assert!(!served.contains("/a1"));
    }
}
