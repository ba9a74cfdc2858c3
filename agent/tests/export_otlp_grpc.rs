//! OTLP/gRPC export against a real local receiver (tonic): resources per process, span fields
//! intact, gzip, collector down then up, queue bound, refusals, give-up and shutdown.

pub mod export_support;

use std::sync::Arc;
use std::time::Duration;

use export_support::*;
use tracer_agent::export::{ExportConfig, Exporter, ExporterKind, OtlpProtocol, RetryConfig};
use tracer_agent::metrics::{Metrics, SpanDrop};

const LIMIT: Duration = Duration::from_secs(10);

fn config(endpoint: String) -> ExportConfig {
    init_logs();
    let mut config = ExportConfig::new(ExporterKind::Otlp {
        protocol: Some(OtlpProtocol::Grpc),
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
    let receiver = grpc_receiver(Answer::Accept).await;
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) = Exporter::start(config(receiver.endpoint()), metrics.clone()).unwrap();
    for item in two_process_items() {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || receiver.received().len() == 2).await);
    exporter.shutdown(Duration::from_secs(2)).await;

    assert_two_processes(&receiver);
    for received in receiver.received() {
        assert_eq!(
            received.header("grpc-encoding"),
            Some("gzip"),
            "{:?}",
            received.headers
        );
    }
    // One batch with two processes: two requests.
    assert_eq!(metrics.export_batches.get(), 2);
    assert_eq!(metrics.spans_exported.get(), 3);
    assert_eq!(metrics.export_errors.get(), 0);
    assert_eq!(metrics.export_queue_length.get(), 0);
    for reason in SpanDrop::ALL {
        assert_eq!(metrics.spans_dropped(reason).get(), 0, "{reason:?}");
    }
}

#[tokio::test]
async fn collector_down_at_start_then_up_gets_every_span_once() {
    let addr = free_addr();
    let metrics = Arc::new(Metrics::new());
    let mut config = config(format!("http://{addr}"));
    config.max_batch = 8;
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    let python = resource("python3", 1234);
    for item in simple_items(30, 1, 1, &python) {
        assert!(handle.submit(item));
    }
    // Connection refused for a while: failures are counted, spans wait.
    assert!(wait_until(LIMIT, || metrics.export_errors.get() >= 3).await);
    assert_eq!(handle.queue_len(), 30);
    assert_eq!(metrics.export_queue_length.get(), 30);

    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let receiver = grpc_receiver_on(listener, Answer::Accept);
    // More spans while it comes back.
    for item in simple_items(10, 31, 1, &python) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || receiver.span_ids().len() >= 40).await);
    exporter.shutdown(Duration::from_secs(2)).await;

    let mut ids = receiver.span_ids();
    assert_eq!(ids.len(), 40, "no span twice");
    ids.sort_unstable();
    assert_eq!(ids, (1..=40).collect::<Vec<_>>());
    assert_eq!(metrics.spans_exported.get(), 40);
    for reason in SpanDrop::ALL {
        assert_eq!(metrics.spans_dropped(reason).get(), 0, "{reason:?}");
    }
}

#[tokio::test]
async fn queue_bound_while_down_drops_the_excess_and_delivers_the_rest() {
    // UNAVAILABLE (14): the collector is there but cannot take data, a retryable answer.
    let receiver = grpc_receiver(Answer::Fail(14)).await;
    let metrics = Arc::new(Metrics::new());
    let mut config = config(receiver.endpoint());
    config.queue_size = 20;
    config.max_batch = 5;
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    let python = resource("python3", 1234);
    let accepted = simple_items(30, 1, 1, &python)
        .into_iter()
        .filter(|item| handle.submit(item.clone()))
        .count();
    assert_eq!(accepted, 20);
    assert_eq!(metrics.spans_dropped(SpanDrop::QueueFull).get(), 10);
    assert!(wait_until(LIMIT, || receiver.refused() >= 2).await);
    assert_eq!(metrics.spans_dropped(SpanDrop::QueueFull).get(), 10);

    receiver.set_answer(Answer::Accept);
    assert!(wait_until(LIMIT, || receiver.span_ids().len() >= 20).await);
    exporter.shutdown(Duration::from_secs(2)).await;

    let mut ids = receiver.span_ids();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=20).collect::<Vec<_>>(),
        "exactly the spans within the bound"
    );
    assert_eq!(metrics.spans_dropped(SpanDrop::QueueFull).get(), 10);
    assert_eq!(metrics.spans_dropped(SpanDrop::ExportFailed).get(), 0);
    assert_eq!(metrics.spans_exported.get(), 20);
    assert!(metrics.export_errors.get() >= 2);
}

#[tokio::test]
async fn refused_data_is_dropped_at_once_without_retry() {
    // INVALID_ARGUMENT (3): retrying the same data cannot help.
    let receiver = grpc_receiver(Answer::Fail(3)).await;
    let metrics = Arc::new(Metrics::new());
    let mut config = config(receiver.endpoint());
    config.retry.initial_backoff = Duration::from_secs(30);
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    for item in simple_items(4, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(
        wait_until(LIMIT, || metrics
            .spans_dropped(SpanDrop::ExportFailed)
            .get()
            == 4)
        .await
    );
    assert_eq!(receiver.refused(), 1);
    assert_eq!(metrics.export_errors.get(), 1);
    assert_eq!(handle.queue_len(), 0);
    exporter.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_batch_failing_past_the_retry_budget_is_given_up() {
    let receiver = grpc_receiver(Answer::Fail(14)).await;
    let metrics = Arc::new(Metrics::new());
    let mut config = config(receiver.endpoint());
    config.retry = RetryConfig {
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
        give_up_after: Duration::from_millis(400),
    };
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    for item in simple_items(3, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(
        wait_until(LIMIT, || metrics
            .spans_dropped(SpanDrop::ExportFailed)
            .get()
            == 3)
        .await
    );
    assert!(receiver.refused() >= 3, "retried: {}", receiver.refused());
    assert_eq!(handle.queue_len(), 0);
    exporter.shutdown(Duration::from_secs(1)).await;
    assert_eq!(metrics.spans_exported.get(), 0);
}

#[tokio::test]
async fn shutdown_while_down_is_bounded_and_counts_what_was_not_sent() {
    let addr = free_addr();
    let metrics = Arc::new(Metrics::new());
    let (exporter, handle) =
        Exporter::start(config(format!("http://{addr}")), metrics.clone()).unwrap();
    for item in simple_items(5, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    assert!(wait_until(LIMIT, || metrics.export_errors.get() >= 1).await);
    let started = std::time::Instant::now();
    exporter.shutdown(Duration::from_millis(300)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(metrics.spans_dropped(SpanDrop::Shutdown).get(), 5);
    assert_eq!(metrics.export_queue_length.get(), 0);

    // After shutdown the handle drops and counts.
    assert!(!handle.submit(simple_items(1, 9, 1, &resource("python3", 1)).remove(0)));
    assert_eq!(metrics.spans_dropped(SpanDrop::Shutdown).get(), 6);
}

#[tokio::test]
async fn shutdown_flushes_a_batch_that_would_still_wait() {
    let receiver = grpc_receiver(Answer::Accept).await;
    let metrics = Arc::new(Metrics::new());
    let mut config = config(receiver.endpoint());
    config.schedule_delay = Duration::from_secs(60);
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    for item in simple_items(3, 1, 1, &resource("python3", 1)) {
        assert!(handle.submit(item));
    }
    exporter.shutdown(Duration::from_secs(2)).await;
    assert_eq!(receiver.span_ids().len(), 3);
    assert_eq!(metrics.spans_exported.get(), 3);
}
