//! ExportConfig from the environment (through a lookup closure, so tests never race on the
//! process environment) and the errors of `Exporter::start`.

pub mod export_support;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tracer_agent::export::{
    ExportConfig, ExportError, Exporter, ExporterKind, OtlpCompression, OtlpProtocol,
};
use tracer_agent::metrics::{Metrics, SpanDrop};

fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let map: HashMap<String, String> = vars
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    move |name| map.get(name).cloned()
}

fn otlp() -> ExporterKind {
    ExporterKind::Otlp {
        protocol: None,
        endpoint: None,
    }
}

#[test]
fn defaults_are_the_designs() {
    let config = ExportConfig::from_lookup(otlp(), lookup(&[])).unwrap();
    assert_eq!(config.queue_size, 10_000);
    assert_eq!(config.max_batch, 1_024);
    assert_eq!(config.schedule_delay, Duration::from_secs(1));
    assert_eq!(config.export_timeout, Duration::from_secs(30));
    assert_eq!(config.compression, OtlpCompression::Gzip);
    assert_eq!(config.retry.initial_backoff, Duration::from_secs(5));
    assert_eq!(config.retry.max_backoff, Duration::from_secs(30));
    assert_eq!(config.retry.give_up_after, Duration::from_secs(300));
    assert_eq!(
        config.kind,
        ExporterKind::Otlp {
            protocol: Some(OtlpProtocol::HttpProtobuf),
            endpoint: None
        }
    );
    assert_eq!(config, {
        let mut new = ExportConfig::new(config.kind.clone());
        new.compression = OtlpCompression::Gzip;
        new
    });
}

#[test]
fn bsp_variables_override_the_defaults() {
    let config = ExportConfig::from_lookup(
        ExporterKind::Console,
        lookup(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "500"),
            ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "100"),
            ("OTEL_BSP_SCHEDULE_DELAY", "250"),
            ("OTEL_BSP_EXPORT_TIMEOUT", " 5000 "),
        ]),
    )
    .unwrap();
    assert_eq!(config.queue_size, 500);
    assert_eq!(config.max_batch, 100);
    assert_eq!(config.schedule_delay, Duration::from_millis(250));
    assert_eq!(config.export_timeout, Duration::from_secs(5));

    // The batch never exceeds the queue; empty values count as unset.
    let config = ExportConfig::from_lookup(
        ExporterKind::Console,
        lookup(&[
            ("OTEL_BSP_MAX_QUEUE_SIZE", "300"),
            ("OTEL_BSP_SCHEDULE_DELAY", ""),
        ]),
    )
    .unwrap();
    assert_eq!(config.max_batch, 300);
    assert_eq!(config.schedule_delay, Duration::from_secs(1));
}

#[test]
fn invalid_values_name_the_variable() {
    for (name, value) in [
        ("OTEL_BSP_MAX_QUEUE_SIZE", "lots"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "-5"),
        ("OTEL_BSP_SCHEDULE_DELAY", "1s"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "0"),
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "carrier-pigeon"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd"),
    ] {
        let error = ExportConfig::from_lookup(otlp(), lookup(&[(name, value)])).unwrap_err();
        assert!(
            matches!(&error, ExportError::InvalidEnv { name: n, .. } if *n == name),
            "{name}={value}: {error:?}"
        );
        let message = error.to_string();
        assert!(message.contains(name), "{message}");
        assert!(message.contains("expected"), "{message}");
    }
}

#[test]
fn otlp_protocol_and_compression_resolve_like_the_specification() {
    let resolve = |vars: &[(&str, &str)]| ExportConfig::from_lookup(otlp(), lookup(vars)).unwrap();
    let protocol = |config: &ExportConfig| match &config.kind {
        ExporterKind::Otlp { protocol, .. } => *protocol,
        _ => None,
    };
    assert_eq!(
        protocol(&resolve(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")])),
        Some(OtlpProtocol::Grpc)
    );
    // The trace-specific variable wins over the generic one.
    let config = resolve(&[
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "HTTP/protobuf"),
        ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip"),
        ("OTEL_EXPORTER_OTLP_TRACES_COMPRESSION", "none"),
    ]);
    assert_eq!(protocol(&config), Some(OtlpProtocol::HttpProtobuf));
    assert_eq!(config.compression, OtlpCompression::Uncompressed);

    // An explicit protocol is kept whatever the variables say.
    let config = ExportConfig::from_lookup(
        ExporterKind::Otlp {
            protocol: Some(OtlpProtocol::Grpc),
            endpoint: Some("http://collector:4317".to_owned()),
        },
        lookup(&[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]),
    )
    .unwrap();
    assert_eq!(protocol(&config), Some(OtlpProtocol::Grpc));
}

#[test]
fn unusable_endpoints_are_refused_with_a_hint() {
    for (name, value) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "collector:4317"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://bad host"),
    ] {
        let error = ExportConfig::from_lookup(otlp(), lookup(&[(name, value)])).unwrap_err();
        let message = error.to_string();
        assert!(
            matches!(error, ExportError::InvalidEndpoint { .. }),
            "{message}"
        );
        assert!(message.contains(name), "{message}");
        assert!(message.contains("http://"), "{message}");
    }
    // The variables do not matter when an endpoint is given.
    ExportConfig::from_lookup(
        ExporterKind::Otlp {
            protocol: None,
            endpoint: Some("http://localhost:4318".to_owned()),
        },
        lookup(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://x")]),
    )
    .unwrap();
}

#[test]
fn the_default_exporter_is_otlp_only_when_an_endpoint_is_configured() {
    assert_eq!(
        ExporterKind::default_from_lookup(lookup(&[])),
        ExporterKind::Console
    );
    assert_eq!(
        ExporterKind::default_from_lookup(lookup(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "")])),
        ExporterKind::Console
    );
    assert_eq!(
        ExporterKind::default_from_lookup(lookup(&[(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "http://c:4318/v1/traces"
        )])),
        otlp()
    );
}

#[test]
fn start_outside_a_runtime_says_so() {
    let error = Exporter::start(
        ExportConfig::new(ExporterKind::Console),
        Arc::new(Metrics::new()),
    )
    .unwrap_err();
    assert!(matches!(error, ExportError::NoRuntime), "{error}");
}

#[tokio::test]
async fn start_errors_say_what_to_fix() {
    let metrics = Arc::new(Metrics::new());
    let error = Exporter::start(
        ExportConfig::new(ExporterKind::Otlp {
            protocol: Some(OtlpProtocol::Grpc),
            endpoint: Some("localhost:4317".to_owned()),
        }),
        metrics.clone(),
    )
    .unwrap_err();
    assert!(
        error.to_string().contains("http://localhost:4317"),
        "{error}"
    );

    let path = PathBuf::from("/nonexistent-dir-for-tracer-tests/spans.jsonl");
    let error = Exporter::start(
        ExportConfig::new(ExporterKind::Jsonl { path: Some(path) }),
        metrics.clone(),
    )
    .unwrap_err();
    let message = error.to_string();
    assert!(matches!(error, ExportError::OpenOutput { .. }), "{message}");
    assert!(message.contains("--output"), "{message}");
    assert!(
        message.contains("/nonexistent-dir-for-tracer-tests"),
        "{message}"
    );

    let mut config = ExportConfig::new(ExporterKind::Console);
    config.queue_size = 0;
    assert!(matches!(
        Exporter::start(config, metrics).unwrap_err(),
        ExportError::InvalidSetting { .. }
    ));
}

#[tokio::test]
async fn a_full_queue_drops_and_counts_without_waiting() {
    let metrics = Arc::new(Metrics::new());
    let path =
        std::env::temp_dir().join(format!("tracer-export-queue-{}.jsonl", std::process::id()));
    let mut config = ExportConfig::new(ExporterKind::Jsonl {
        path: Some(path.clone()),
    });
    config.queue_size = 3;
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    let resource = export_support::resource("python3", 1);
    // The export task has not run yet (single thread, no await): everything stays queued.
    let results: Vec<bool> = export_support::simple_items(5, 1, 1, &resource)
        .into_iter()
        .map(|item| handle.submit(item))
        .collect();
    assert_eq!(results, [true, true, true, false, false]);
    assert_eq!(metrics.spans_dropped(SpanDrop::QueueFull).get(), 2);
    assert_eq!(metrics.export_queue_length.get(), 3);
    exporter.shutdown(Duration::from_secs(1)).await;
    assert_eq!(metrics.spans_exported.get(), 3);
    assert_eq!(metrics.export_queue_length.get(), 0);
    let _ = std::fs::remove_file(path);
}
