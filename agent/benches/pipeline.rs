//! Userspace cost per HTTP exchange, from ring buffer records to an exported span: decode,
//! syscall assembly, conntrack, reassembly, HTTP/1 parsing, span synthesis, then OTLP
//! http/protobuf export with gzip to a local sink that accepts every request, on one thread
//! (the agent's own runtime is single-threaded too).
//!
//! Run: `cargo bench -p tracer-agent --bench pipeline` (prints ns per exchange). `cargo xtask
//! bench` runs it too, beside the kernel-side figures.
mod support;

use std::{
    hint::black_box,
    sync::Arc,
    time::{Duration, Instant},
};

use tracer_agent::{
    capture::decode::encode_record,
    clock::Clock,
    export::{ExportConfig, Exporter, ExporterKind, OtlpProtocol},
    link::{DEFAULT_REORDER_WINDOW_NS, Linker},
    metrics::Metrics,
    pipeline::{Pipeline, SpanStage},
    resource::ResourceBuilder,
    sample::Sampler,
    spans::SpanFactory,
    streams::StreamLimits,
};
use tracer_common::{
    CloseEvent, ConnEvent, DataEvent, EventHeader, Tuple, conn_flags, data_flags, direction, kind,
    role, syscall,
};

/// The agent's allocator, so the figures are the agent's.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const REQUEST: &[u8] = b"GET /api/items?id=42 HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\
User-Agent: curl/7.88.1\r\nAccept: */*\r\n\
traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\r\n\r\n";
const RESPONSE: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\n\
Content-Type: application/json\r\nContent-Length: 26\r\nConnection: keep-alive\r\n\r\n\
{\"id\":42,\"name\":\"widget\"}\n";

fn header(kind: u32, conn_id: u64, ts_ns: u64) -> EventHeader {
    EventHeader {
        kind,
        pid: std::process::id(),
        tid: std::process::id(),
        fd: 7,
        conn_id,
        ts_ns,
    }
}

fn data(conn_id: u64, dir: u32, pos: u64, payload: &[u8], ts_ns: u64) -> Vec<u8> {
    let event = DataEvent {
        header: header(kind::DATA, conn_id, ts_ns),
        enter_ns: ts_ns - 1_000,
        syscall_pos: pos,
        syscall_len: payload.len() as u64,
        chunk_offset: 0,
        captured_len: payload.len() as u32,
        direction: dir,
        syscall: if dir == direction::INGRESS {
            syscall::READ
        } else {
            syscall::WRITE
        },
        flags: data_flags::FIRST_CHUNK | data_flags::LAST_CHUNK,
        chunk_index: 0,
    };
    encode_record(&event, payload)
}

/// The OPEN record of a server connection accepted on loopback port `port`.
fn accepted(conn_id: u64, port: u16, start_ns: u64, comm: [u8; 16]) -> Vec<u8> {
    let mut tuple = Tuple {
        family: 2,
        sport: port,
        dport: 40_000 + (conn_id % 20_000) as u16,
        ..Default::default()
    };
    tuple.saddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    tuple.daddr[..4].copy_from_slice(&[127, 0, 0, 1]);
    let open = ConnEvent {
        header: header(kind::OPEN, conn_id, start_ns),
        role: role::SERVER,
        flags: conn_flags::TUPLE_KNOWN,
        tuple,
        syscall: syscall::READ,
        _pad: 0,
        comm,
    };
    encode_record(&open, &[])
}

/// The records of `exchanges` keep-alive exchanges on one server connection.
fn connection(conn_id: u64, exchanges: usize, start_ns: u64) -> Vec<Vec<u8>> {
    let mut records = vec![accepted(
        conn_id,
        8080,
        start_ns,
        *b"nginx\0\0\0\0\0\0\0\0\0\0\0",
    )];
    let mut ts = start_ns;
    for i in 0..exchanges as u64 {
        ts += 10_000;
        records.push(data(
            conn_id,
            direction::INGRESS,
            i * REQUEST.len() as u64,
            REQUEST,
            ts,
        ));
        ts += 50_000;
        records.push(data(
            conn_id,
            direction::EGRESS,
            i * RESPONSE.len() as u64,
            RESPONSE,
            ts,
        ));
    }
    let close = CloseEvent {
        header: header(kind::CLOSE, conn_id, ts + 1_000),
        egress_bytes: (exchanges * RESPONSE.len()) as u64,
        ingress_bytes: (exchanges * REQUEST.len()) as u64,
    };
    records.push(encode_record(&close, &[]));
    records
}

type Dump = tracer_agent::dump::Dump<std::io::Sink>;

/// A real gRPC capture (grpcio, 60 unary calls on one connection), as `C hex` (client to
/// server) and `S hex` (server to client) lines, one read per line.
const GRPC_CAPTURE: &str = include_str!("../src/http2/testdata/grpc_many_calls.txt");

/// The records of the capture seen from the server: one connection `conn_id` starting at
/// `start_ns`, 10 us between syscalls. Returns the records and the calls they hold.
fn grpc_connection(conn_id: u64, start_ns: u64) -> (Vec<Vec<u8>>, usize) {
    let mut records = vec![accepted(
        conn_id,
        50051,
        start_ns,
        *b"python3\0\0\0\0\0\0\0\0\0",
    )];
    let (mut ts, mut pos) = (start_ns, [0u64; 2]);
    let mut calls = 0;
    for line in GRPC_CAPTURE.lines() {
        let (dir, hex) = match line.split_once(' ') {
            Some(("C", hex)) => (direction::INGRESS, hex),
            Some(("S", hex)) => (direction::EGRESS, hex),
            _ => continue,
        };
        let bytes: Vec<u8> = (0..hex.len() / 2)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).expect("hex capture"))
            .collect();
        // Client HEADERS frames that open a stream: one call each.
        if dir == direction::INGRESS {
            calls += bytes
                .windows(5)
                .filter(|w| w[3] == 1 && w[4] & 0x4 != 0)
                .count();
        }
        ts += 10_000;
        let slot = usize::from(dir == direction::EGRESS);
        records.push(data(conn_id, dir, pos[slot], &bytes, ts));
        pos[slot] += bytes.len() as u64;
    }
    let close = CloseEvent {
        header: header(kind::CLOSE, conn_id, ts + 1_000),
        egress_bytes: pos[1],
        ingress_bytes: pos[0],
    };
    records.push(encode_record(&close, &[]));
    (records, calls)
}

/// Runs `records` through a fresh pipeline exporting to a local sink; returns the time to
/// queued spans, the time including export, and the spans exported.
fn measure(
    runtime: &tokio::runtime::Runtime,
    records: &[Vec<u8>],
    queue: usize,
) -> (Duration, Duration, u64) {
    runtime.block_on(async {
        let metrics = Arc::new(Metrics::new());
        let mut config = ExportConfig::new(ExporterKind::Otlp {
            protocol: Some(OtlpProtocol::HttpProtobuf),
            endpoint: Some(support::sink()),
        });
        // Room for every span: the figure is the cost of exporting them all, not of dropping.
        config.queue_size = queue + 1;
        let (exporter, handle) = Exporter::start(config, metrics.clone()).expect("exporter");
        let stage = SpanStage {
            linker: Linker::new(Sampler::default(), DEFAULT_REORDER_WINDOW_NS),
            factory: SpanFactory::new(Clock::new()),
            resources: ResourceBuilder::new(None, Vec::new()),
            export: handle,
        };
        let mut pipeline = Pipeline::new(StreamLimits::default(), None::<Dump>, Some(stage));
        let start = Instant::now();
        for record in records {
            pipeline.handle(black_box(record));
        }
        // Links what still waits in the reorder window, as at shutdown.
        pipeline.tick(u64::MAX);
        let pipeline_time = start.elapsed();
        exporter.shutdown(Duration::from_secs(120)).await;
        let total = start.elapsed();
        // The figures are only those of the normal path if nothing failed to parse (a wrong
        // Content-Length once sent half the responses through resynchronisation unseen).
        pipeline.publish(&metrics);
        let text = metrics.encode();
        let errors: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("tracer_parse_errors_total") && !l.ends_with(" 0"))
            .collect();
        assert!(
            errors.is_empty(),
            "the bench's traffic must parse: {errors:?}"
        );
        let exported = text
            .lines()
            .find_map(|l| l.strip_prefix("tracer_spans_exported_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        (pipeline_time, total, exported)
    })
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    // HTTP/1.1 only, for profiling that stage alone (e.g. under callgrind).
    let http1_only = std::env::args().any(|a| a == "--http1-only");
    let connections = if quick { 200 } else { 2_000 };
    let per_connection = 50;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    // One connection after another (each spans 3 ms), so the linking stage's 50 ms reorder
    // window holds what it would at about 16,000 exchanges/s.
    let records: Vec<Vec<u8>> = (0..connections)
        .flat_map(|c| {
            connection(
                c as u64 + 1,
                per_connection,
                1_000_000_000 + c as u64 * 3_100_000,
            )
        })
        .collect();
    let exchanges = connections * per_connection;
    let grpc_connections = connections * per_connection / 60;
    let mut grpc_records = Vec::new();
    let mut calls = 0;
    for c in 0..grpc_connections {
        let (records, n) =
            grpc_connection(1_000_000 + c as u64, 1_000_000_000 + c as u64 * 1_300_000);
        grpc_records.extend(records);
        calls += n;
    }

    // Side by side in one run: HTTP/1.1 exchanges, then gRPC unary calls.
    let (h1_pipeline, h1_total, h1_exported) = measure(&runtime, &records, exchanges);
    assert_eq!(
        h1_exported as usize, exchanges,
        "every exchange must become an exported span"
    );
    let per = |d: Duration, n: usize| d.as_nanos() as f64 / n as f64;
    println!(
        "pipeline: {exchanges} HTTP/1.1 exchanges on {connections} connections: \
         {:.0} ns/exchange to a queued span, {:.0} ns/exchange including OTLP http/protobuf \
         export (gzip)",
        per(h1_pipeline, exchanges),
        per(h1_total, exchanges)
    );
    if http1_only {
        return;
    }
    let (g_pipeline, g_total, g_exported) = measure(&runtime, &grpc_records, calls);
    assert_eq!(
        g_exported as usize, calls,
        "every gRPC call must become an exported span"
    );
    println!(
        "pipeline: {calls} gRPC unary calls on {grpc_connections} HTTP/2 connections: \
         {:.0} ns/call to a queued span, {:.0} ns/call including OTLP http/protobuf export \
         (gzip)",
        per(g_pipeline, calls),
        per(g_total, calls)
    );
}
