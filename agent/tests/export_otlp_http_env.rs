//! OTEL_EXPORTER_OTLP_TRACES_TIMEOUT and OTEL_EXPORTER_OTLP_ENDPOINT for the http/protobuf
//! exporter, from the process environment. The environment is process-wide, so this file holds
//! a single test that sets it before any runtime starts.

pub mod export_support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use export_support::*;
use tracer_agent::export::{ExportConfig, Exporter, ExporterKind, RetryConfig};
use tracer_agent::metrics::{Metrics, SpanDrop};

const LIMIT: Duration = Duration::from_secs(10);

#[test]
fn timeout_and_base_endpoint_from_the_environment() {
    // A collector that accepts connections and never answers the first request.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let connections = Arc::new(AtomicUsize::new(0));
    let counted = Arc::clone(&connections);
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in silent.incoming().flatten() {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(stream);
        }
    });

    // SAFETY: the only test of this binary; no other thread reads the environment.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "300");
        std::env::set_var("OTEL_EXPORTER_OTLP_TIMEOUT", "60000");
        std::env::set_var(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("http://{silent_addr}"),
        );
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT");
        std::env::remove_var("OTEL_EXPORTER_OTLP_PROTOCOL");
        std::env::remove_var("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        // No endpoint option: the base variable, plus /v1/traces.
        let mut config = ExportConfig::from_env(ExporterKind::Otlp {
            protocol: None,
            endpoint: None,
        })
        .unwrap();
        config.schedule_delay = Duration::from_millis(20);
        config.retry = RetryConfig {
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_millis(100),
            give_up_after: Duration::from_secs(60),
        };
        let metrics = Arc::new(Metrics::new());
        let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
        for item in simple_items(2, 1, 1, &resource("python3", 1)) {
            assert!(handle.submit(item));
        }
        // Each attempt gives up after 300 ms (the traces variable wins) and is retried.
        assert!(wait_until(LIMIT, || metrics.export_errors.get() >= 3).await);
        exporter.shutdown(Duration::from_millis(500)).await;
        assert!(connections.load(Ordering::SeqCst) >= 1);
        assert_eq!(metrics.spans_exported.get(), 0);
        assert_eq!(metrics.spans_dropped(SpanDrop::Shutdown).get(), 2);
    });
    drop(runtime);

    // The same variables toward a collector that answers: the path is /v1/traces.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let receiver = http_receiver(Answer::Accept).await;
        // SAFETY: single-threaded runtime, nothing else reads the environment now.
        unsafe {
            std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint());
        }
        let mut config = ExportConfig::from_env(ExporterKind::Otlp {
            protocol: None,
            endpoint: None,
        })
        .unwrap();
        config.schedule_delay = Duration::from_millis(20);
        let (exporter, handle) = Exporter::start(config, Arc::new(Metrics::new())).unwrap();
        for item in simple_items(2, 1, 1, &resource("python3", 1)) {
            assert!(handle.submit(item));
        }
        assert!(wait_until(LIMIT, || receiver.span_ids().len() == 2).await);
        exporter.shutdown(Duration::from_secs(1)).await;
        assert_eq!(receiver.received()[0].path, "/v1/traces");
    });
}
