//! Cost per span of the export stage: `N` finished HTTP server spans (the attributes `spans.rs`
//! gives an nginx exchange, strings owned as there) are built and submitted one after another,
//! as the pipeline does, then the exporter batches, encodes, gzips and POSTs them over OTLP
//! http/protobuf to a local sink and drops them. Figures per span, as CPU time of the thread
//! (the sink reads on other threads; CPU time is disturbed less than wall time on a shared
//! machine): building and submitting (what the pipeline pays, with the span's construction),
//! exporting (from `shutdown` until every span was delivered: the export task), and both.
//!
//! Run: `cargo bench -p tracer-agent --bench export` (prints the median of several rounds).
mod support;

use std::{
    sync::Arc,
    time::{Duration, SystemTime},
};

use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue, StringValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use tracer_agent::{
    export::{ExportConfig, ExportItem, Exporter, ExporterKind, OtlpProtocol},
    metrics::Metrics,
};

// The agent's allocator, so allocation and drop costs are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn resource(pid: i64) -> Arc<Resource> {
    Arc::new(
        Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", "nginx"),
                KeyValue::new("process.pid", pid),
                KeyValue::new("process.executable.name", "nginx"),
                KeyValue::new("process.executable.path", "/usr/sbin/nginx"),
                KeyValue::new("host.name", "bench-host"),
                KeyValue::new("telemetry.sdk.name", "tracer-agent"),
                KeyValue::new("telemetry.sdk.version", "0.1.0"),
            ])
            .build(),
    )
}

/// A server span as `spans.rs` builds one for `GET /api/items?id=42` answered 200.
fn span(i: u64, scope: &InstrumentationScope) -> SpanData {
    let ip: Arc<str> = Arc::from("127.0.0.1");
    let start =
        SystemTime::UNIX_EPOCH + Duration::from_nanos(1_760_000_000_000_000_000 + i * 40_000);
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(0x4bf9_2f35_77b3_4da6_a3ce_929d_0e0e_4736_u128 + u128::from(i)),
            SpanId::from(0x1000 + i),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from(0x00f0_67aa_0ba9_02b7),
        parent_span_is_remote: true,
        span_kind: SpanKind::Server,
        name: "GET".into(),
        start_time: start,
        end_time: start + Duration::from_micros(50),
        attributes: vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("url.path", "/api/items".to_owned()),
            KeyValue::new("url.query", "id=42".to_owned()),
            KeyValue::new("url.scheme", "http"),
            KeyValue::new("server.address", "127.0.0.1".to_owned()),
            KeyValue::new("server.port", 8080_i64),
            KeyValue::new("client.address", StringValue::from(Arc::clone(&ip))),
            KeyValue::new("network.peer.address", StringValue::from(ip)),
            KeyValue::new("network.peer.port", 40_000 + (i % 20_000) as i64),
            KeyValue::new("network.protocol.version", "1.1"),
            KeyValue::new("user_agent.original", "curl/7.88.1".to_owned()),
            KeyValue::new("http.response.status_code", 200_i64),
            KeyValue::new("http.response.body.size", 27_i64),
            KeyValue::new("tracer_agent.link", "server"),
        ],
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope.clone(),
    }
}

/// CPU time of the calling thread.
fn thread_cpu() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec for the call to fill.
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    assert_eq!(status, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

/// CPU ns per span for building and submitting `count` spans from `processes` processes
/// taking turns, and for exporting them.
fn round(runtime: &tokio::runtime::Runtime, count: usize, processes: usize) -> (f64, f64) {
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let mut config = ExportConfig::new(ExporterKind::Otlp {
            protocol: Some(OtlpProtocol::HttpProtobuf),
            endpoint: Some(support::sink()),
        });
        config.queue_size = count + 1;
        let (exporter, handle) = Exporter::start(config, metrics.clone()).expect("exporter");
        let scope = InstrumentationScope::builder("tracer-agent")
            .with_version("0.1.0")
            .build();
        let resources: Vec<_> = (0..processes as i64).map(|p| resource(4_000 + p)).collect();
        let submit_start = thread_cpu();
        for i in 0..count as u64 {
            let process = i as usize % processes;
            let item = ExportItem {
                resource_id: process as u64,
                resource: Arc::clone(&resources[process]),
                span: span(i, &scope),
            };
            assert!(handle.submit(item), "the queue has room for every span");
        }
        let export_start = thread_cpu();
        exporter.shutdown(Duration::from_secs(120)).await;
        let end = thread_cpu();
        let exported = metrics
            .encode()
            .lines()
            .find_map(|l| l.strip_prefix("tracer_spans_exported_total "))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        assert_eq!(exported, count, "every span must be exported");
        let per = |d: Duration| d.as_nanos() as f64 / count as f64;
        (per(export_start - submit_start), per(end - export_start))
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (count, rounds) = if quick { (20_000, 3) } else { (100_000, 7) };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // One process (one request per batch), then nginx-like workers (one request per worker
    // and batch), then many small processes (small requests).
    for processes in [1, 4, 64] {
        let (mut submit, mut export): (Vec<f64>, Vec<f64>) = (0..rounds)
            .map(|_| round(&runtime, count, processes))
            .unzip();
        let mut total: Vec<f64> = submit.iter().zip(&export).map(|(s, e)| s + e).collect();
        let median = |figures: &mut Vec<f64>| {
            figures.sort_by(f64::total_cmp);
            figures[rounds / 2]
        };
        println!(
            "export: {count} HTTP server spans from {processes} processes, OTLP http/protobuf \
             (gzip), batches of 1,024, CPU ns/span, medians of {rounds}: build and submit {:.0}, \
             export {:.0}, total {:.0}",
            median(&mut submit),
            median(&mut export),
            median(&mut total)
        );
    }
}
