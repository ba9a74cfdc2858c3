//! The console exporter's trace trees: shape, grace period, orphans, memory bound.

pub mod export_support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use export_support::*;
use opentelemetry::KeyValue;
use opentelemetry::trace::SpanKind;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;
use tracer_agent::export::{ConsoleConfig, TraceTrees, render_trace};

fn parent_and_child() -> (SpanData, SpanData) {
    let server = SpanSpec {
        end_ms: 12.3,
        attributes: vec![
            KeyValue::new("url.path", "/index.html"),
            KeyValue::new("http.response.status_code", 200_i64),
        ],
        ..SpanSpec::new(0x1111, 0, SpanKind::Server)
    }
    .build();
    let client = SpanSpec {
        start_ms: 4.0,
        end_ms: 7.1,
        attributes: vec![
            KeyValue::new("url.full", "http://127.0.0.1:9000/api"),
            KeyValue::new("http.response.status_code", 500_i64),
        ],
        error: true,
        ..SpanSpec::new(0x2222, 0x1111, SpanKind::Client)
    }
    .build();
    (server, client)
}

const PAIR: &str = "\
trace 4bf92f3577b34da6a3ce929d0e0e4736  (2 spans, 12.3 ms)
└─ SERVER python3 (pid 1234)  GET /index.html  200  12.3 ms
   └─ CLIENT python3 (pid 1234)  GET http://127.0.0.1:9000/api  500 ERROR  3.1 ms
";

#[test]
fn a_parent_child_pair_prints_as_a_tree_after_the_grace_period() {
    let python = resource("python3", 1234);
    let (server, client) = parent_and_child();
    let mut trees = TraceTrees::new(ConsoleConfig::default());
    let t0 = Instant::now();
    // The child finishes, and arrives, first.
    assert!(trees.push(python.clone(), client, t0).is_empty());
    assert!(
        trees
            .push(python, server, t0 + Duration::from_millis(10))
            .is_empty()
    );
    assert!(trees.take_ready(t0 + Duration::from_millis(300)).is_empty());
    assert_eq!(trees.next_wake(), Some(t0 + Duration::from_millis(510)));
    let ready = trees.take_ready(t0 + Duration::from_millis(520));
    assert_eq!(ready, [PAIR]);
    assert_eq!(trees.pending_spans(), 0);
    assert_eq!(trees.next_wake(), None);
}

#[test]
fn siblings_nest_and_processes_are_named() {
    let python = resource("python3", 1234);
    let nginx = resource("nginx", 99);
    let spans: Vec<(Arc<Resource>, SpanData)> = vec![
        (
            python.clone(),
            SpanSpec {
                end_ms: 20.0,
                ..SpanSpec::new(1, 0, SpanKind::Server)
            }
            .build(),
        ),
        (
            python.clone(),
            SpanSpec {
                start_ms: 10.0,
                end_ms: 15.0,
                ..SpanSpec::new(3, 1, SpanKind::Client)
            }
            .build(),
        ),
        (
            python,
            SpanSpec {
                start_ms: 1.0,
                end_ms: 9.0,
                ..SpanSpec::new(2, 1, SpanKind::Client)
            }
            .build(),
        ),
        (
            nginx,
            SpanSpec {
                name: "POST",
                start_ms: 2.0,
                end_ms: 0.0 + 8.5,
                attributes: vec![
                    KeyValue::new("url.path", "/v1"),
                    KeyValue::new("url.query", "a=1"),
                ],
                ..SpanSpec::new(4, 2, SpanKind::Server)
            }
            .build(),
        ),
    ];
    let expected = "\
trace 4bf92f3577b34da6a3ce929d0e0e4736  (4 spans, 20.0 ms)
└─ SERVER python3 (pid 1234)  GET  20.0 ms
   ├─ CLIENT python3 (pid 1234)  GET  8.0 ms
   │  └─ SERVER nginx (pid 99)  POST /v1?a=1  6.5 ms
   └─ CLIENT python3 (pid 1234)  GET  5.0 ms
";
    assert_eq!(render_trace(&spans), expected);
}

#[test]
fn orphans_wait_longer_and_say_their_parent_is_missing() {
    let python = resource("python3", 1234);
    let (_, client) = parent_and_child();
    let mut trees = TraceTrees::new(ConsoleConfig::default());
    let t0 = Instant::now();
    trees.push(python, client, t0);
    // No root yet: the parent may still be running.
    assert!(trees.take_ready(t0 + Duration::from_secs(1)).is_empty());
    let ready = trees.take_ready(t0 + Duration::from_secs(5));
    assert_eq!(
        ready,
        ["trace 4bf92f3577b34da6a3ce929d0e0e4736  (1 span, 3.1 ms)\n\
          └─ CLIENT python3 (pid 1234)  GET http://127.0.0.1:9000/api  500 ERROR  3.1 ms  \
          (parent 0000000000001111 not seen)\n"]
    );
}

#[test]
fn the_memory_bound_prints_the_oldest_trace_early() {
    let python = resource("python3", 1);
    let mut trees = TraceTrees::new(ConsoleConfig {
        max_pending_spans: 2,
        ..ConsoleConfig::default()
    });
    let t0 = Instant::now();
    let span = |trace: u128| {
        SpanSpec {
            trace,
            ..SpanSpec::new(1, 0, SpanKind::Server)
        }
        .build()
    };
    assert!(trees.push(python.clone(), span(1), t0).is_empty());
    assert!(
        trees
            .push(python.clone(), span(2), t0 + Duration::from_millis(1))
            .is_empty()
    );
    let early = trees.push(python, span(3), t0 + Duration::from_millis(2));
    assert_eq!(early.len(), 1);
    assert!(
        early[0].starts_with("trace 00000000000000000000000000000001 "),
        "{}",
        early[0]
    );
    assert_eq!(trees.pending_spans(), 2);
    assert_eq!(trees.take_all().len(), 2);
}
