//! The http/protobuf encoder (`TraceEncoder`) against opentelemetry-proto: for the same spans,
//! its bytes decode (prost) to the `ExportTraceServiceRequest` that opentelemetry-proto's
//! `group_spans_by_resource_and_scope` builds, and are the very bytes prost encodes for it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use opentelemetry::trace::{
    Event, Link, SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{Array, InstrumentationScope, KeyValue, StringValue, Value};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::transform::common::tonic::ResourceAttributesWithSchema;
use opentelemetry_proto::transform::trace::tonic::group_spans_by_resource_and_scope;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use proptest::prelude::*;
use prost::Message as _;
use tracer_agent::export::TraceEncoder;

/// What opentelemetry-proto builds: one `ResourceSpans` per resource (same `Arc`), in order of
/// first appearance, as the encoder groups them.
fn reference(items: &[(Arc<Resource>, SpanData)]) -> ExportTraceServiceRequest {
    let mut groups: Vec<(Arc<Resource>, Vec<SpanData>)> = Vec::new();
    for (resource, span) in items {
        match groups
            .iter_mut()
            .find(|(known, _)| Arc::ptr_eq(known, resource) || **known == **resource)
        {
            Some((_, spans)) => spans.push(span.clone()),
            None => groups.push((Arc::clone(resource), vec![span.clone()])),
        }
    }
    let resource_spans = groups
        .into_iter()
        .flat_map(|(resource, spans)| {
            group_spans_by_resource_and_scope(
                spans,
                &ResourceAttributesWithSchema::from(&*resource),
            )
        })
        .collect();
    ExportTraceServiceRequest { resource_spans }
}

fn encode(items: &[(Arc<Resource>, SpanData)]) -> Vec<u8> {
    let mut out = Vec::new();
    TraceEncoder::new().encode_request(&mut out, items);
    out
}

/// `ours == theirs`, reporting the first difference rather than both buffers (they can be long).
fn assert_same_bytes(ours: &[u8], theirs: &[u8]) {
    if ours != theirs {
        let at = ours
            .iter()
            .zip(theirs)
            .position(|(a, b)| a != b)
            .unwrap_or(ours.len().min(theirs.len()));
        let window =
            |bytes: &[u8]| bytes[at.saturating_sub(8)..(at + 16).min(bytes.len())].to_vec();
        panic!(
            "the bytes differ from prost's at offset {at} (lengths {} and {}): ours {:?}, \
             prost {:?}",
            ours.len(),
            theirs.len(),
            window(ours),
            window(theirs)
        );
    }
}

/// Decodes our bytes and compares with opentelemetry-proto's message, then the bytes with
/// prost's encoding of that message.
fn assert_equivalent(items: &[(Arc<Resource>, SpanData)]) {
    let expected = reference(items);
    let ours = encode(items);
    let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).expect("our bytes decode");
    assert_eq!(decoded, expected);
    assert_same_bytes(&ours, &expected.encode_to_vec());
}

fn at(nanos: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos)
}

fn scope(name: &'static str) -> InstrumentationScope {
    InstrumentationScope::builder(name).build()
}

fn span(trace: u128, id: u64, parent: u64) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace),
            SpanId::from(id),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::from(parent),
        parent_span_is_remote: false,
        span_kind: SpanKind::Server,
        name: "GET /".into(),
        start_time: at(1_704_067_200_000_000_000),
        end_time: at(1_704_067_200_012_300_000),
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: scope("tracer-agent"),
    }
}

fn every_value_type() -> Vec<KeyValue> {
    vec![
        KeyValue::new("str", "value"),
        KeyValue::new("str.empty", ""),
        KeyValue::new("str.unicode", "héllo wörld ✓ 日本語 🚀"),
        KeyValue::new("str.long", "x".repeat(200)),
        KeyValue::new("str.longer", "y".repeat(20_000)),
        KeyValue::new("bool.true", true),
        KeyValue::new("bool.false", false),
        KeyValue::new("int.zero", 0_i64),
        KeyValue::new("int.small", 200_i64),
        KeyValue::new("int.negative", -1_i64),
        KeyValue::new("int.max", i64::MAX),
        KeyValue::new("int.min", i64::MIN),
        KeyValue::new("double.zero", 0.0),
        KeyValue::new("double.negative_zero", -0.0),
        KeyValue::new("double", -1.5e-300),
        KeyValue::new("double.inf", f64::INFINITY),
        KeyValue::new("array.bool", Value::Array(Array::Bool(vec![true, false]))),
        KeyValue::new("array.int", Value::Array(Array::I64(vec![0, -7, i64::MAX]))),
        KeyValue::new(
            "array.double",
            Value::Array(Array::F64(vec![1.0, f64::NEG_INFINITY])),
        ),
        KeyValue::new(
            "array.string",
            Value::Array(Array::String(vec![
                StringValue::from(""),
                StringValue::from("ü"),
                StringValue::from("z".repeat(300)),
            ])),
        ),
        KeyValue::new("array.empty", Value::Array(Array::I64(Vec::new()))),
        KeyValue::new("", "empty key"),
    ]
}

fn process(service: &str, pid: i64) -> Arc<Resource> {
    Arc::new(
        Resource::builder_empty()
            .with_attributes([
                KeyValue::new("service.name", service.to_owned()),
                KeyValue::new("process.pid", pid),
                KeyValue::new("telemetry.sdk.name", "tracer-agent"),
            ])
            .build(),
    )
}

#[test]
fn a_wide_set_of_spans_encodes_like_opentelemetry_proto() {
    let python = process("python3", 1234);
    let nginx = process("nginx", 99);
    let empty = Arc::new(Resource::builder_empty().build());
    let with_schema = Arc::new(
        Resource::builder_empty()
            .with_schema_url(
                [KeyValue::new("service.name", "ünïcode")],
                "https://opentelemetry.io/schemas/1.26.0",
            )
            .build(),
    );
    // Equal to `python` but another Arc: the same ResourceSpans.
    let python_again = process("python3", 1234);

    let versioned = InstrumentationScope::builder("lib")
        .with_version("1.2.3")
        .with_schema_url("https://opentelemetry.io/schemas/1.21.0")
        .with_attributes([KeyValue::new("a", 1_i64), KeyValue::new("b", "two")])
        .build();
    // Equal to `versioned` (attribute order does not count): the same ScopeSpans.
    let versioned_reordered = InstrumentationScope::builder("lib")
        .with_version("1.2.3")
        .with_schema_url("https://opentelemetry.io/schemas/1.21.0")
        .with_attributes([KeyValue::new("b", "two"), KeyValue::new("a", 1_i64)])
        .build();

    let mut items: Vec<(Arc<Resource>, SpanData)> = Vec::new();

    // Every attribute value type; a root (invalid parent).
    let mut all_types = span(1, 1, 0);
    all_types.attributes = every_value_type();
    all_types.dropped_attributes_count = 3;
    items.push((Arc::clone(&python), all_types));

    // A remote parent, tracestate, error with a message, unsampled.
    let mut remote = span(2, 2, 0xabcdef);
    remote.span_context = SpanContext::new(
        TraceId::from(2),
        SpanId::from(2),
        TraceFlags::default(),
        false,
        "vendor=abc,other@tenant=x-y".parse::<TraceState>().unwrap(),
    );
    remote.parent_span_is_remote = true;
    remote.span_kind = SpanKind::Client;
    remote.status = Status::error("upstream said 503 — ünïcode");
    items.push((Arc::clone(&nginx), remote));

    // Error without a message, Ok, every kind, empty name, zero and pre-epoch times.
    for (index, kind) in [
        SpanKind::Internal,
        SpanKind::Server,
        SpanKind::Client,
        SpanKind::Producer,
        SpanKind::Consumer,
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = span(3, 10 + index as u64, 1);
        s.span_kind = kind;
        s.status = match index {
            0 => Status::error(""),
            1 => Status::Ok,
            _ => Status::Unset,
        };
        if index == 2 {
            s.name = Cow::Borrowed("");
            s.start_time = SystemTime::UNIX_EPOCH;
            s.end_time = SystemTime::UNIX_EPOCH - Duration::from_secs(5);
        }
        items.push((Arc::clone(&python), s));
    }

    // Events and links, with dropped counts.
    let mut eventful = span(4, 20, 0);
    eventful.events = SpanEvents::default();
    eventful.events.events = vec![
        Event::new(
            "exception",
            at(1_704_067_200_001_000_000),
            vec![
                KeyValue::new("exception.type", "IOError"),
                KeyValue::new("exception.message", "broken pipe ✗"),
            ],
            2,
        ),
        Event::new("", SystemTime::UNIX_EPOCH, Vec::new(), 0),
    ];
    eventful.events.dropped_count = 5;
    eventful.links = SpanLinks::default();
    eventful.links.links = vec![
        Link::new(
            SpanContext::new(
                TraceId::from(0x77),
                SpanId::from(0x88),
                TraceFlags::SAMPLED,
                true,
                "k=v".parse::<TraceState>().unwrap(),
            ),
            vec![KeyValue::new("link.reason", "follows")],
            1,
        ),
        Link::with_context(SpanContext::new(
            TraceId::from(0x99),
            SpanId::from(0xaa),
            TraceFlags::default(),
            false,
            TraceState::default(),
        )),
    ];
    eventful.links.dropped_count = 1;
    eventful.instrumentation_scope = versioned.clone();
    items.push((Arc::clone(&with_schema), eventful));

    // Several scopes in one resource, interleaved; equal scopes share a ScopeSpans.
    for (index, scope) in [
        versioned.clone(),
        scope("tracer-agent"),
        versioned_reordered,
        scope(""),
        versioned,
    ]
    .into_iter()
    .enumerate()
    {
        let mut s = span(5, 30 + index as u64, 0);
        s.instrumentation_scope = scope;
        items.push((Arc::clone(&with_schema), s));
    }

    // Resources that repeat, an empty one, an equal one under another Arc.
    items.push((Arc::clone(&empty), span(6, 40, 0)));
    items.push((python_again, span(6, 41, 40)));
    items.push((Arc::clone(&nginx), span(6, 42, 41)));
    // Ids of all zeros (invalid), as they are.
    items.push((Arc::clone(&empty), span(0, 0, 0)));

    assert_equivalent(&items);

    // Per resource too, as the exporter sends them.
    for (resource, span) in &items {
        assert_equivalent(&[(Arc::clone(resource), span.clone())]);
    }
}

#[test]
fn nothing_to_encode_is_an_empty_request() {
    assert!(encode(&[]).is_empty());
    assert_eq!(reference(&[]).encode_to_vec(), Vec::<u8>::new());
}

#[test]
fn nan_is_written_bit_for_bit() {
    // NaN != NaN, so compare bytes only.
    let mut s = span(1, 1, 0);
    s.attributes = vec![
        KeyValue::new("nan", f64::NAN),
        KeyValue::new("nans", Value::Array(Array::F64(vec![f64::NAN, 1.0]))),
    ];
    let items = [(process("p", 1), s)];
    let ours = encode(&items);
    assert_same_bytes(&ours, &reference(&items).encode_to_vec());
    let decoded = ExportTraceServiceRequest::decode(ours.as_slice()).unwrap();
    let attribute = &decoded.resource_spans[0].scope_spans[0].spans[0].attributes[0];
    match attribute.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::DoubleValue(value)) => assert!(value.is_nan()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_encoder_and_its_buffer_can_be_reused() {
    let python = process("python3", 1);
    let mut encoder = TraceEncoder::new();
    let mut out = Vec::new();
    for round in 0..3_u64 {
        out.clear();
        let items: Vec<_> = (0..=round)
            .map(|i| (Arc::clone(&python), span(7, 1 + i, 0)))
            .collect();
        encoder.encode_request(&mut out, &items);
        assert_same_bytes(&out, &reference(&items).encode_to_vec());
    }
}

// ---- random spans --------------------------------------------------------------------------

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        4 => "\\PC{0,12}",
        1 => "[a-z]{120,300}",
        1 => Just(String::new()),
    ]
}

/// Any f64 but NaN (see `nan_is_written_bit_for_bit`).
fn double() -> impl Strategy<Value = f64> {
    prop::num::f64::NORMAL
        | prop::num::f64::SUBNORMAL
        | prop::num::f64::ZERO
        | prop::num::f64::INFINITE
        | prop::num::f64::NEGATIVE
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::I64),
        double().prop_map(Value::F64),
        text().prop_map(Value::from),
        prop::collection::vec(any::<bool>(), 0..4).prop_map(|v| Value::Array(Array::Bool(v))),
        prop::collection::vec(any::<i64>(), 0..4).prop_map(|v| Value::Array(Array::I64(v))),
        prop::collection::vec(double(), 0..4).prop_map(|v| Value::Array(Array::F64(v))),
        prop::collection::vec(text(), 0..4).prop_map(|v| Value::Array(Array::String(
            v.into_iter().map(StringValue::from).collect()
        ))),
    ]
}

fn attributes(max: usize) -> impl Strategy<Value = Vec<KeyValue>> {
    prop::collection::vec(
        (text(), value()).prop_map(|(key, value)| KeyValue::new(key, value)),
        0..max,
    )
}

fn trace_state() -> impl Strategy<Value = TraceState> {
    prop::collection::vec(("[a-z][a-z0-9_*/-]{0,8}", "[a-zA-Z0-9!.:;]{1,10}"), 0..3).prop_map(
        |pairs| {
            // Duplicate keys and the like are refused: no trace state then.
            TraceState::from_key_value(pairs).unwrap_or_default()
        },
    )
}

fn time() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        1 => Just(SystemTime::UNIX_EPOCH),
        1 => (1_u64..1_000_000).prop_map(|s| SystemTime::UNIX_EPOCH - Duration::from_secs(s)),
        6 => any::<u64>().prop_map(at),
    ]
}

fn context() -> impl Strategy<Value = SpanContext> {
    (
        any::<u128>(),
        any::<u64>(),
        any::<u8>(),
        any::<bool>(),
        trace_state(),
    )
        .prop_map(|(trace, span, flags, remote, state)| {
            SpanContext::new(
                TraceId::from(trace),
                SpanId::from(span),
                TraceFlags::new(flags),
                remote,
                state,
            )
        })
}

/// A dropped count: mostly 0, as in real spans.
fn count() -> impl Strategy<Value = u32> {
    prop_oneof![2 => Just(0_u32), 1 => any::<u32>()]
}

fn event() -> impl Strategy<Value = Event> {
    (text(), time(), attributes(3), count())
        .prop_map(|(name, time, attributes, dropped)| Event::new(name, time, attributes, dropped))
}

fn link() -> impl Strategy<Value = Link> {
    (context(), attributes(3), count())
        .prop_map(|(context, attributes, dropped)| Link::new(context, attributes, dropped))
}

fn status() -> impl Strategy<Value = Status> {
    prop_oneof![
        Just(Status::Unset),
        Just(Status::Ok),
        text().prop_map(Status::error),
    ]
}

fn kind() -> impl Strategy<Value = SpanKind> {
    prop_oneof![
        Just(SpanKind::Internal),
        Just(SpanKind::Server),
        Just(SpanKind::Client),
        Just(SpanKind::Producer),
        Just(SpanKind::Consumer),
    ]
}

fn scopes() -> Vec<InstrumentationScope> {
    vec![
        scope("tracer-agent"),
        InstrumentationScope::builder("lib")
            .with_version("0.1")
            .with_schema_url("https://opentelemetry.io/schemas/1.21.0")
            .with_attributes([KeyValue::new("k", true)])
            .build(),
        scope(""),
    ]
}

fn resources() -> Vec<Arc<Resource>> {
    vec![
        process("python3", 1),
        process("nginx", 2),
        Arc::new(Resource::builder_empty().build()),
        Arc::new(
            Resource::builder_empty()
                .with_schema_url(
                    [KeyValue::new("service.name", "s"), KeyValue::new("x", 1.5)],
                    "https://opentelemetry.io/schemas/1.26.0",
                )
                .build(),
        ),
    ]
}

/// A span plus which resource and scope of the pools it belongs to.
fn item() -> impl Strategy<Value = (usize, usize, SpanData)> {
    let ids = (
        context(),
        prop_oneof![Just(0_u64), any::<u64>()],
        any::<bool>(),
    );
    let body = (kind(), text(), time(), time(), attributes(6), count());
    let extras = (
        prop::collection::vec(event(), 0..3),
        count(),
        prop::collection::vec(link(), 0..3),
        count(),
        status(),
    );
    (0..4_usize, 0..3_usize, ids, body, extras).prop_map(|(resource, scope, ids, body, extras)| {
        (resource, scope, span_of(ids, body, extras))
    })
}

type Ids = (SpanContext, u64, bool);
type Body = (SpanKind, String, SystemTime, SystemTime, Vec<KeyValue>, u32);
type Extras = (Vec<Event>, u32, Vec<Link>, u32, Status);

fn span_of(ids: Ids, body: Body, extras: Extras) -> SpanData {
    let (context, parent, remote) = ids;
    let (kind, name, start, end, attributes, dropped) = body;
    let (events, dropped_events, links, dropped_links, status) = extras;
    let mut span_events = SpanEvents::default();
    span_events.events = events;
    span_events.dropped_count = dropped_events;
    let mut span_links = SpanLinks::default();
    span_links.links = links;
    span_links.dropped_count = dropped_links;
    SpanData {
        span_context: context,
        parent_span_id: SpanId::from(parent),
        parent_span_is_remote: remote,
        span_kind: kind,
        name: name.into(),
        start_time: start,
        end_time: end,
        attributes,
        dropped_attributes_count: dropped,
        events: span_events,
        links: span_links,
        status,
        instrumentation_scope: InstrumentationScope::default(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn random_spans_encode_like_opentelemetry_proto(
        picks in prop::collection::vec(item(), 0..12)
    ) {
        let resources = resources();
        let scopes = scopes();
        let items: Vec<(Arc<Resource>, SpanData)> = picks
            .into_iter()
            .map(|(resource, scope, mut span)| {
                span.instrumentation_scope = scopes[scope].clone();
                (Arc::clone(&resources[resource]), span)
            })
            .collect();
        let expected = reference(&items);
        let ours = encode(&items);
        let decoded = ExportTraceServiceRequest::decode(ours.as_slice());
        prop_assert!(decoded.is_ok(), "{decoded:?}");
        prop_assert_eq!(decoded.ok(), Some(expected.clone()));
        assert_same_bytes(&ours, &expected.encode_to_vec());
    }
}
