//! The OTLP variables opentelemetry-otlp reads from the process environment itself
//! (OTEL_EXPORTER_OTLP_HEADERS), and ours (OTEL_EXPORTER_OTLP_COMPRESSION) through
//! `ExportConfig::from_env`. The environment is process-wide, so this file holds a single test
//! that sets it before any thread or runtime starts.

pub mod export_support;

use std::sync::Arc;
use std::time::Duration;

use export_support::*;
use tracer_agent::export::{
    ExportConfig, Exporter, ExporterKind, OtlpCompression, OtlpProtocol, RetryConfig,
};
use tracer_agent::metrics::Metrics;

const LIMIT: Duration = Duration::from_secs(10);

fn config(protocol: OtlpProtocol, endpoint: String) -> ExportConfig {
    let mut config = ExportConfig::from_env(ExporterKind::Otlp {
        protocol: Some(protocol),
        endpoint: Some(endpoint),
    })
    .unwrap();
    config.schedule_delay = Duration::from_millis(20);
    config.retry = RetryConfig {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
        give_up_after: Duration::from_secs(60),
    };
    config
}

/// Sends two spans to `receiver` and returns what arrived.
async fn send(receiver: &Receiver, protocol: OtlpProtocol) -> Received {
    let (exporter, handle) = Exporter::start(
        config(protocol, receiver.endpoint()),
        Arc::new(Metrics::new()),
    )
    .unwrap();
    for item in simple_items(2, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || !receiver.received().is_empty()).await);
    exporter.shutdown(Duration::from_secs(2)).await;
    receiver.received().remove(0)
}

#[test]
fn headers_and_compression_from_the_environment() {
    // SAFETY: the only test of this binary; no other thread reads the environment yet.
    unsafe {
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-tenant=acme, authorization=Bearer%20s3cret",
        );
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_HEADERS");
        std::env::remove_var("OTEL_EXPORTER_OTLP_COMPRESSION");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (receiver, protocol) in [
            (grpc_receiver(Answer::Accept).await, OtlpProtocol::Grpc),
            (
                http_receiver(Answer::Accept).await,
                OtlpProtocol::HttpProtobuf,
            ),
        ] {
            let received = send(&receiver, protocol).await;
            assert_eq!(received.header("x-tenant"), Some("acme"), "{protocol:?}");
            assert_eq!(
                received.header("authorization"),
                Some("Bearer s3cret"),
                "{protocol:?}"
            );
            let encoding = match protocol {
                OtlpProtocol::Grpc => "grpc-encoding",
                OtlpProtocol::HttpProtobuf => "content-encoding",
            };
            assert_eq!(received.header(encoding), Some("gzip"), "{protocol:?}");
        }
    });
    drop(runtime);

    // SAFETY: as above; the runtime and its threads are gone.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_COMPRESSION", "none");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        for (receiver, protocol) in [
            (grpc_receiver(Answer::Accept).await, OtlpProtocol::Grpc),
            (
                http_receiver(Answer::Accept).await,
                OtlpProtocol::HttpProtobuf,
            ),
        ] {
            assert_eq!(
                config(protocol, receiver.endpoint()).compression,
                OtlpCompression::Uncompressed
            );
            let received = send(&receiver, protocol).await;
            let encoding = match protocol {
                OtlpProtocol::Grpc => received.header("grpc-encoding"),
                OtlpProtocol::HttpProtobuf => received.header("content-encoding"),
            };
            assert!(
                encoding.is_none_or(|value| value == "identity"),
                "{protocol:?}: {encoding:?}"
            );
            assert_eq!(received.request.resource_spans.len(), 1);
        }
    });
}
