//! The jsonl exporter: one OTLP/JSON ExportTraceServiceRequest per line, hex ids, one
//! ResourceSpans per process, appended to the output file.

pub mod export_support;

use std::sync::Arc;
use std::time::Duration;

use export_support::*;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use serde_json::Value;
use tracer_agent::export::{ExportConfig, Exporter, ExporterKind};
use tracer_agent::metrics::Metrics;

fn temp_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("tracer-export-{}-{name}.jsonl", std::process::id()))
}

#[tokio::test]
async fn lines_are_otlp_json_with_hex_ids() {
    let path = temp_path("lines");
    let _ = std::fs::remove_file(&path);
    let metrics = Arc::new(Metrics::new());
    let mut config = ExportConfig::new(ExporterKind::Jsonl {
        path: Some(path.clone()),
    });
    config.schedule_delay = Duration::from_millis(20);
    let (exporter, handle) = Exporter::start(config, metrics.clone()).unwrap();
    for item in two_process_items() {
        assert!(handle.submit(item));
    }
    // A batch is flushed as soon as it is written.
    assert!(
        wait_until(Duration::from_secs(5), || {
            std::fs::read_to_string(&path).is_ok_and(|text| text.ends_with('\n'))
        })
        .await
    );
    // A second batch appends a second line.
    for item in simple_items(1, 0x77, 3, &resource("redis", 7)) {
        assert!(handle.submit(item));
    }
    exporter.shutdown(Duration::from_secs(2)).await;
    assert_eq!(metrics.spans_exported.get(), 4);

    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");

    let first: Value = serde_json::from_str(lines[0]).unwrap();
    let resource_spans = first["resourceSpans"].as_array().unwrap();
    assert_eq!(resource_spans.len(), 2, "one ResourceSpans per process");
    let python = &resource_spans[0];
    let attributes = python["resource"]["attributes"].as_array().unwrap();
    assert!(
        attributes
            .iter()
            .any(|kv| kv["key"] == "service.name" && kv["value"]["stringValue"] == "python3")
    );
    // OTLP/JSON: 64-bit integers are decimal strings.
    assert!(
        attributes
            .iter()
            .any(|kv| kv["key"] == "process.pid" && kv["value"]["intValue"] == "1234")
    );

    let spans = python["scopeSpans"][0]["spans"].as_array().unwrap();
    let server = &spans[0];
    assert_eq!(server["traceId"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(server["spanId"], "0000000000001111");
    assert_eq!(server["name"], "GET");
    // Enums are integers: SERVER = 2.
    assert_eq!(server["kind"], 2);
    assert_eq!(server["startTimeUnixNano"], nanos(at(0.0)).to_string());
    let client = &spans[1];
    assert_eq!(client["parentSpanId"], "0000000000001111");
    assert_eq!(client["kind"], 3);
    assert_eq!(client["status"]["code"], 2);

    // And each line reads back as the request it encodes.
    for line in &lines {
        let request: ExportTraceServiceRequest = serde_json::from_str(line).unwrap();
        for span in request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
        {
            assert_eq!(span.trace_id, TRACE.to_be_bytes());
            assert_eq!(span.span_id.len(), 8);
        }
    }
    let second: ExportTraceServiceRequest = serde_json::from_str(lines[1]).unwrap();
    assert_eq!(second.resource_spans.len(), 1);
    assert_eq!(
        second.resource_spans[0].scope_spans[0].spans[0].span_id,
        0x77_u64.to_be_bytes()
    );
    let _ = std::fs::remove_file(&path);
}
