//! OTLP/HTTP (protobuf) export against a real local receiver (hyper): resources per process,
//! span fields intact, gzip, the /v1/traces path, retryable and final HTTP answers.

pub mod export_support;

use std::sync::Arc;
use std::time::Duration;

use export_support::*;
use tracer_agent::export::{ExportConfig, Exporter, ExporterKind, OtlpProtocol, RetryConfig};
use tracer_agent::metrics::{Metrics, SpanDrop};

const LIMIT: Duration = Duration::from_secs(10);

fn config(endpoint: String) -> ExportConfig {
    let mut config = ExportConfig::new(ExporterKind::Otlp {
        protocol: Some(OtlpProtocol::HttpProtobuf),
        endpoint: Some(endpoint),
    });
    config.schedule_delay = Duration::from_millis(50);
    config.export_timeout = Duration::from_secs(5);
    config.retry = RetryConfig {
        initial_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(300),
        give_up_after: Duration::from_secs(60),
    };
    config
}

#[tokio::test]
async fn two_processes_arrive_as_two_resource_spans_gzipped() {
    let receiver = http_receiver(Answer::Accept).await;
    let metrics = Arc::new(Metrics::new());
    // A base URL, as OTEL_EXPORTER_OTLP_ENDPOINT would be: /v1/traces is added.
    let (exporter, handle) = Exporter::start(config(receiver.endpoint()), metrics.clone()).unwrap();
    for item in two_process_items() {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || receiver.received().len() == 2).await);
    exporter.shutdown(Duration::from_secs(2)).await;

    assert_two_processes(&receiver);
    for received in receiver.received() {
        assert_eq!(received.path, "/v1/traces");
        assert_eq!(received.header("content-encoding"), Some("gzip"));
        assert_eq!(
            received.header("content-type"),
            Some("application/x-protobuf")
        );
    }
    assert_eq!(metrics.export_batches.get(), 2);
    assert_eq!(metrics.spans_exported.get(), 3);
}

#[tokio::test]
async fn service_unavailable_is_retried_until_accepted() {
    let receiver = http_receiver(Answer::Fail(503)).await;
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) = Exporter::start(config(receiver.endpoint()), metrics.clone()).unwrap();
    for item in simple_items(6, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || receiver.refused() >= 2).await);
    receiver.set_answer(Answer::Accept);
    assert!(wait_until(LIMIT, || receiver.span_ids().len() >= 6).await);
    exporter.shutdown(Duration::from_secs(2)).await;
    let mut ids = receiver.span_ids();
    ids.sort_unstable();
    assert_eq!(ids, (1..=6).collect::<Vec<_>>());
    assert!(metrics.export_errors.get() >= 2);
    assert_eq!(metrics.spans_dropped(SpanDrop::ExportFailed).get(), 0);
}

#[tokio::test]
async fn collector_down_at_start_then_up_gets_every_span_once() {
    init_logs();
    let addr = free_addr();
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) =
        Exporter::start(config(format!("http://{addr}")), metrics.clone()).unwrap();
    for item in simple_items(12, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || metrics.export_errors.get() >= 2).await);
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let receiver = http_receiver_on(listener, Answer::Accept);
    assert!(wait_until(LIMIT, || receiver.span_ids().len() >= 12).await);
    exporter.shutdown(Duration::from_secs(2)).await;
    let mut ids = receiver.span_ids();
    ids.sort_unstable();
    assert_eq!(ids, (1..=12).collect::<Vec<_>>(), "each span once");
    assert_eq!(metrics.spans_exported.get(), 12);
}

#[tokio::test]
async fn bad_request_is_final() {
    let receiver = http_receiver(Answer::Fail(400)).await;
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) = Exporter::start(config(receiver.endpoint()), metrics.clone()).unwrap();
    for item in simple_items(2, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(
        wait_until(LIMIT, || metrics
            .spans_dropped(SpanDrop::ExportFailed)
            .get()
            == 2)
        .await
    );
    assert_eq!(receiver.refused(), 1);
    exporter.shutdown(Duration::from_secs(1)).await;
}
