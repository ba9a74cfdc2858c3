//! A protobuf encoder for OTLP `ExportTraceServiceRequest`, written straight from `SpanData`.
//!
//! opentelemetry-otlp first converts every span into opentelemetry-proto's structs (copying each
//! string), lets prost encode them and then drops the copies. Here the bytes are written from the
//! spans as they are, into a buffer the caller reuses: no intermediate structs, no string copies.
//!
//! # Lengths
//! A nested message is preceded by its length, so the length must be known before its bytes are
//! written. A span is written after a guessed 2 bytes for its length (128 bytes to 16 KiB),
//! filled in once the span is written; a wrong guess moves the span's bytes, which are still in
//! the cache then. The small messages inside a span (attributes, events, links, status) are
//! sized on the fly while writing, which is only arithmetic on string lengths. The messages
//! around the spans (`ScopeSpans`, `ResourceSpans`) are assembled from encoded spans, whose
//! lengths are known. Padding a length to a fixed width instead would be valid protobuf, but
//! not the canonical form some receivers and our tests compare against.
//!
//! # Encoded early
//! The OTLP/HTTP exporter encodes each span when it is queued ([`encode_span`], called by
//! `ExportHandle::submit`), while the span's strings are still in the cache from being built,
//! and drops it then; a request is later assembled from those bytes
//! ([`TraceEncoder::write_resource_spans`]). [`TraceEncoder::encode_resource_spans`] goes the
//! same way, so the tests comparing it with opentelemetry-proto cover both.
//!
//! # The output
//! The same message opentelemetry-proto's `group_spans_by_resource_and_scope` builds, and the
//! same bytes prost writes for it: fields in field-number order (so a span's `flags`, field 16,
//! comes last although the proto declares it after `parent_span_id`), proto3 defaults left out
//! except where
//! opentelemetry-proto sets an optional message (resource, scope, status, each attribute's value)
//! or a oneof member (an empty string or 0 attribute value is still written). Scopes are grouped
//! in order of first appearance, spans keep their order within a scope.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{Event, Link, SpanId, SpanKind, Status, TraceState};
use opentelemetry::{Array, InstrumentationScope, KeyValue, Value};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SpanData;

/// Field keys: `(field number << 3) | wire type`, wire types VARINT = 0, I64 = 1, LEN = 2,
/// I32 = 5. All fit one byte except `Span.flags` (field 16).
mod key {
    // ExportTraceServiceRequest
    pub const REQUEST_RESOURCE_SPANS: u8 = 1 << 3 | 2;
    // ResourceSpans
    pub const RESOURCE_SPANS_RESOURCE: u8 = 1 << 3 | 2;
    pub const RESOURCE_SPANS_SCOPE_SPANS: u8 = 2 << 3 | 2;
    pub const RESOURCE_SPANS_SCHEMA_URL: u8 = 3 << 3 | 2;
    // Resource
    pub const RESOURCE_ATTRIBUTES: u8 = 1 << 3 | 2;
    // ScopeSpans
    pub const SCOPE_SPANS_SCOPE: u8 = 1 << 3 | 2;
    pub const SCOPE_SPANS_SPANS: u8 = 2 << 3 | 2;
    pub const SCOPE_SPANS_SCHEMA_URL: u8 = 3 << 3 | 2;
    // InstrumentationScope
    pub const SCOPE_NAME: u8 = 1 << 3 | 2;
    pub const SCOPE_VERSION: u8 = 2 << 3 | 2;
    pub const SCOPE_ATTRIBUTES: u8 = 3 << 3 | 2;
    // Span
    pub const SPAN_TRACE_ID: u8 = 1 << 3 | 2;
    pub const SPAN_SPAN_ID: u8 = 2 << 3 | 2;
    pub const SPAN_TRACE_STATE: u8 = 3 << 3 | 2;
    pub const SPAN_PARENT_SPAN_ID: u8 = 4 << 3 | 2;
    /// Field 16, I32: the varint 133 takes two bytes.
    pub const SPAN_FLAGS: [u8; 2] = [0x85, 0x01];
    pub const SPAN_NAME: u8 = 5 << 3 | 2;
    pub const SPAN_KIND: u8 = 6 << 3;
    pub const SPAN_START: u8 = 7 << 3 | 1;
    pub const SPAN_END: u8 = 8 << 3 | 1;
    pub const SPAN_ATTRIBUTES: u8 = 9 << 3 | 2;
    pub const SPAN_DROPPED_ATTRIBUTES: u8 = 10 << 3;
    pub const SPAN_EVENTS: u8 = 11 << 3 | 2;
    pub const SPAN_DROPPED_EVENTS: u8 = 12 << 3;
    pub const SPAN_LINKS: u8 = 13 << 3 | 2;
    pub const SPAN_DROPPED_LINKS: u8 = 14 << 3;
    pub const SPAN_STATUS: u8 = 15 << 3 | 2;
    // Span.Event
    pub const EVENT_TIME: u8 = 1 << 3 | 1;
    pub const EVENT_NAME: u8 = 2 << 3 | 2;
    pub const EVENT_ATTRIBUTES: u8 = 3 << 3 | 2;
    pub const EVENT_DROPPED_ATTRIBUTES: u8 = 4 << 3;
    // Span.Link
    pub const LINK_TRACE_ID: u8 = 1 << 3 | 2;
    pub const LINK_SPAN_ID: u8 = 2 << 3 | 2;
    pub const LINK_TRACE_STATE: u8 = 3 << 3 | 2;
    pub const LINK_ATTRIBUTES: u8 = 4 << 3 | 2;
    pub const LINK_DROPPED_ATTRIBUTES: u8 = 5 << 3;
    pub const LINK_FLAGS: u8 = 6 << 3 | 5;
    // Status
    pub const STATUS_MESSAGE: u8 = 2 << 3 | 2;
    pub const STATUS_CODE: u8 = 3 << 3;
    // KeyValue
    pub const KV_KEY: u8 = 1 << 3 | 2;
    pub const KV_VALUE: u8 = 2 << 3 | 2;
    // AnyValue (a oneof: the member present is written even when it holds its default)
    pub const ANY_STRING: u8 = 1 << 3 | 2;
    pub const ANY_BOOL: u8 = 2 << 3;
    pub const ANY_INT: u8 = 3 << 3;
    pub const ANY_DOUBLE: u8 = 4 << 3 | 1;
    pub const ANY_ARRAY: u8 = 5 << 3 | 2;
    // ArrayValue
    pub const ARRAY_VALUES: u8 = 1 << 3 | 2;
}

/// `SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK`: opentelemetry-proto always sets it.
const FLAG_HAS_IS_REMOTE: u32 = 0x100;
/// `SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK`: the parent (or linked span) is remote.
const FLAG_IS_REMOTE: u32 = 0x200;

/// Encodes OTLP trace requests. Holds scratch space only; reuse one encoder (and one output
/// buffer) for every request so neither allocates once warm.
#[derive(Debug, Default)]
pub struct TraceEncoder {
    /// For each span of the resource being written, the index of its scope.
    span_scopes: Vec<usize>,
    /// For each item of [`Self::encode_request`], the index of its resource group.
    item_groups: Vec<usize>,
    /// The spans of [`Self::encode_resource_spans`], encoded one after another.
    spans: Vec<u8>,
    /// Where each of those ends in `spans`.
    span_ends: Vec<usize>,
}

/// The guessed width of a span's length: 128 bytes to 16 KiB.
const SPAN_WIDTH_GUESS: usize = 2;

/// Appends `span` as a `ScopeSpans.spans` field (key, length, `Span`): what
/// [`TraceEncoder::write_resource_spans`] assembles requests from.
pub(super) fn encode_span(out: &mut Vec<u8>, span: &SpanData) {
    out.push(key::SCOPE_SPANS_SPANS);
    let at = out.len();
    out.extend_from_slice(&[0; SPAN_WIDTH_GUESS]);
    put_span(out, span);
    fill_len(out, at, SPAN_WIDTH_GUESS);
}

impl TraceEncoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends to `out` an `ExportTraceServiceRequest` for `items`: one `ResourceSpans` per
    /// resource (the same `Arc`, or equal resources), in order of first appearance, each with one
    /// `ScopeSpans` per instrumentation scope. `out` is not cleared: pass an empty buffer for a
    /// request of its own.
    pub fn encode_request(&mut self, out: &mut Vec<u8>, items: &[(Arc<Resource>, SpanData)]) {
        let mut resources: Vec<&Arc<Resource>> = Vec::new();
        let mut groups = std::mem::take(&mut self.item_groups);
        groups.clear();
        for (resource, _) in items {
            let group = match resources
                .iter()
                .position(|known| Arc::ptr_eq(known, resource) || ***known == **resource)
            {
                Some(group) => group,
                None => {
                    resources.push(resource);
                    resources.len() - 1
                }
            };
            groups.push(group);
        }
        for (group, resource) in resources.iter().enumerate() {
            let spans = items
                .iter()
                .zip(&groups)
                .filter(move |(_, of)| **of == group)
                .map(|((_, span), _)| span);
            self.encode_resource_spans(out, resource, spans);
        }
        self.item_groups = groups;
    }

    /// Appends to `out` one `ResourceSpans` (field 1 of `ExportTraceServiceRequest`) holding
    /// `spans` under `resource`. A request is nothing but these, so calling this once per
    /// resource on an empty buffer builds a whole request.
    pub fn encode_resource_spans<'a, I>(&mut self, out: &mut Vec<u8>, resource: &Resource, spans: I)
    where
        I: Iterator<Item = &'a SpanData> + Clone,
    {
        let mut encoded = std::mem::take(&mut self.spans);
        let mut ends = std::mem::take(&mut self.span_ends);
        encoded.clear();
        ends.clear();
        for span in spans.clone() {
            encode_span(&mut encoded, span);
            ends.push(encoded.len());
        }
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let items = spans
            .zip(starts.zip(&ends))
            .map(|(span, (start, end))| (&span.instrumentation_scope, &encoded[start..*end]));
        self.write_resource_spans(out, resource, items);
        self.spans = encoded;
        self.span_ends = ends;
    }

    /// Appends to `out` one `ResourceSpans` holding `spans`: each span's scope and its bytes
    /// from [`encode_span`].
    pub(super) fn write_resource_spans<'a, I>(
        &mut self,
        out: &mut Vec<u8>,
        resource: &Resource,
        spans: I,
    ) where
        I: Iterator<Item = (&'a InstrumentationScope, &'a [u8])> + Clone,
    {
        // Each span's scope and each ScopeSpans' size; agents have one or a few scopes, so a
        // linear search.
        self.span_scopes.clear();
        let mut scopes: Vec<(&InstrumentationScope, usize)> = Vec::new();
        for (scope, bytes) in spans.clone() {
            let index = match scopes
                .iter()
                .position(|(known, _)| same_scope(known, scope))
            {
                Some(index) => index,
                None => {
                    let header = len_field(scope_size(scope)) + str_field(scope_schema(scope));
                    scopes.push((scope, header));
                    scopes.len() - 1
                }
            };
            scopes[index].1 += bytes.len();
            self.span_scopes.push(index);
        }
        let resource_size = resource_size(resource);
        let mut body = len_field(resource_size) + str_field(resource.schema_url().unwrap_or(""));
        for (_, size) in &scopes {
            body += len_field(*size);
        }

        out.reserve(len_field(body));
        let start = out.len();
        out.push(key::REQUEST_RESOURCE_SPANS);
        put_varint(out, body as u64);
        out.push(key::RESOURCE_SPANS_RESOURCE);
        put_varint(out, resource_size as u64);
        for (key, value) in resource.iter() {
            put_key_value(out, key::RESOURCE_ATTRIBUTES, key.as_str(), value);
        }
        for (index, (scope, size)) in scopes.iter().enumerate() {
            out.push(key::RESOURCE_SPANS_SCOPE_SPANS);
            put_varint(out, *size as u64);
            out.push(key::SCOPE_SPANS_SCOPE);
            put_varint(out, scope_size(scope) as u64);
            put_str(out, key::SCOPE_NAME, scope.name());
            put_str(out, key::SCOPE_VERSION, scope.version().unwrap_or(""));
            for kv in scope.attributes() {
                put_key_value(out, key::SCOPE_ATTRIBUTES, kv.key.as_str(), &kv.value);
            }
            let of_scope = spans.clone().zip(&self.span_scopes);
            for ((_, bytes), _) in of_scope.filter(|(_, of)| **of == index) {
                out.extend_from_slice(bytes);
            }
            put_str(out, key::SCOPE_SPANS_SCHEMA_URL, scope_schema(scope));
        }
        put_str(
            out,
            key::RESOURCE_SPANS_SCHEMA_URL,
            resource.schema_url().unwrap_or(""),
        );
        debug_assert_eq!(
            out.len() - start,
            len_field(body),
            "sizing and writing disagree"
        );
    }
}

/// Writes into the `reserved` bytes at `at` the length of what follows them up to the end of
/// `out`, moving those bytes if the length takes another width. Returns the width.
fn fill_len(out: &mut Vec<u8>, at: usize, reserved: usize) -> usize {
    let body = at + reserved;
    let len = out.len() - body;
    let width = varint_len(len as u64);
    if width > reserved {
        out.resize(out.len() + width - reserved, 0);
        out.copy_within(body..body + len, at + width);
    } else if width < reserved {
        out.copy_within(body..body + len, at + width);
        out.truncate(at + width + len);
    }
    let mut value = len as u64;
    for byte in &mut out[at..at + width - 1] {
        *byte = (value as u8) | 0x80;
        value >>= 7;
    }
    out[at + width - 1] = value as u8;
    width
}

/// Whether two spans share a `ScopeSpans`: `InstrumentationScope` equality, as
/// opentelemetry-proto groups them, with a cheap check first (equality sorts the attributes).
fn same_scope(a: &InstrumentationScope, b: &InstrumentationScope) -> bool {
    if a.name() != b.name() || a.version() != b.version() || a.schema_url() != b.schema_url() {
        return false;
    }
    a.attributes().eq(b.attributes()) || a == b
}

fn scope_schema(scope: &InstrumentationScope) -> &str {
    scope.schema_url().unwrap_or("")
}

// ---- sizes ---------------------------------------------------------------------------------

/// Bytes of `value` as a varint (prost's formula).
#[inline]
fn varint_len(value: u64) -> usize {
    ((((value | 1).leading_zeros() ^ 63) * 9 + 73) / 64) as usize
}

/// Bytes of a length-delimited field with a one-byte key and a body of `len` bytes.
#[inline]
fn len_field(len: usize) -> usize {
    1 + varint_len(len as u64) + len
}

/// Bytes of a string field, left out when empty (proto3 default).
#[inline]
fn str_field(value: &str) -> usize {
    if value.is_empty() {
        0
    } else {
        len_field(value.len())
    }
}

/// Bytes of a varint field with a one-byte key, left out when 0.
#[inline]
fn varint_field(value: u64) -> usize {
    if value == 0 { 0 } else { 1 + varint_len(value) }
}

/// Bytes of a fixed64 field, left out when 0.
#[inline]
fn fixed64_field(value: u64) -> usize {
    if value == 0 { 0 } else { 9 }
}

/// Nanoseconds since the epoch; 0 before it (as opentelemetry-proto's `to_nanos`).
#[inline]
fn nanos(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64)
}

/// Length of `TraceState::header()` ("k1=v1,k2=v2"), without building it.
fn trace_state_len(state: &TraceState) -> usize {
    let mut len = 0;
    for (index, (key, value)) in state.into_iter().enumerate() {
        len += usize::from(index > 0) + key.len() + 1 + value.len();
    }
    len
}

fn resource_size(resource: &Resource) -> usize {
    resource
        .iter()
        .map(|(key, value)| len_field(key_value_size(key.as_str(), value)))
        .sum()
}

fn scope_size(scope: &InstrumentationScope) -> usize {
    str_field(scope.name())
        + str_field(scope.version().unwrap_or(""))
        + attributes_size(scope.attributes())
}

fn attributes_size<'a>(attributes: impl IntoIterator<Item = &'a KeyValue>) -> usize {
    attributes
        .into_iter()
        .map(|kv| len_field(key_value_size(kv.key.as_str(), &kv.value)))
        .sum()
}

fn key_value_size(key: &str, value: &Value) -> usize {
    // The value is an optional message opentelemetry-proto always sets: written even if empty.
    str_field(key) + len_field(any_value_size(value))
}

fn any_value_size(value: &Value) -> usize {
    match value {
        Value::Bool(_) => 2,
        Value::I64(value) => 1 + varint_len(*value as u64),
        Value::F64(_) => 9,
        Value::String(value) => len_field(value.as_str().len()),
        Value::Array(array) => len_field(array_size(array)),
        // A variant newer than this encoder: sent as its text form.
        other => len_field(other.as_str().len()),
    }
}

fn array_size(array: &Array) -> usize {
    // Each element is an AnyValue message: key + length + (oneof key + value).
    match array {
        Array::Bool(values) => values.len() * 4,
        Array::I64(values) => values
            .iter()
            .map(|value| len_field(1 + varint_len(*value as u64)))
            .sum(),
        Array::F64(values) => values.len() * 11,
        Array::String(values) => values
            .iter()
            .map(|value| len_field(len_field(value.as_str().len())))
            .sum(),
        // An array type newer than this encoder: sent empty.
        _ => 0,
    }
}

fn event_size(event: &Event) -> usize {
    fixed64_field(nanos(event.timestamp))
        + str_field(&event.name)
        + attributes_size(&event.attributes)
        + varint_field(u64::from(event.dropped_attributes_count))
}

fn link_size(link: &Link) -> usize {
    let context = &link.span_context;
    18 + 10
        + str_field_len(trace_state_len(context.trace_state()))
        + attributes_size(&link.attributes)
        + varint_field(u64::from(link.dropped_attributes_count))
        + 5
}

fn str_field_len(len: usize) -> usize {
    if len == 0 { 0 } else { len_field(len) }
}

fn status_size(status: &Status) -> usize {
    match status {
        Status::Unset => 0,
        Status::Ok => 2,
        Status::Error { description } => str_field(description) + 2,
    }
}

fn kind_value(kind: &SpanKind) -> u64 {
    match kind {
        SpanKind::Internal => 1,
        SpanKind::Server => 2,
        SpanKind::Client => 3,
        SpanKind::Producer => 4,
        SpanKind::Consumer => 5,
    }
}

// ---- writing -------------------------------------------------------------------------------

#[inline]
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// A string field; nothing when empty.
#[inline]
fn put_str(out: &mut Vec<u8>, key: u8, value: &str) {
    if !value.is_empty() {
        out.push(key);
        put_varint(out, value.len() as u64);
        out.extend_from_slice(value.as_bytes());
    }
}

/// A varint field; nothing when 0.
#[inline]
fn put_varint_field(out: &mut Vec<u8>, key: u8, value: u64) {
    if value != 0 {
        out.push(key);
        put_varint(out, value);
    }
}

/// A fixed64 field; nothing when 0.
#[inline]
fn put_fixed64(out: &mut Vec<u8>, key: u8, value: u64) {
    if value != 0 {
        out.push(key);
        out.extend_from_slice(&value.to_le_bytes());
    }
}

fn put_trace_state(out: &mut Vec<u8>, key: u8, state: &TraceState) {
    let len = trace_state_len(state);
    if len == 0 {
        return;
    }
    out.push(key);
    put_varint(out, len as u64);
    for (index, (name, value)) in state.into_iter().enumerate() {
        if index > 0 {
            out.push(b',');
        }
        out.extend_from_slice(name.as_bytes());
        out.push(b'=');
        out.extend_from_slice(value.as_bytes());
    }
}

/// A `KeyValue` message as field `field`.
fn put_key_value(out: &mut Vec<u8>, field: u8, key: &str, value: &Value) {
    let value_size = any_value_size(value);
    let size = str_field(key) + len_field(value_size);
    // Nearly every attribute is shorter than 128 bytes, so every length inside it is one byte:
    // its framing goes out in two or three writes of fixed bytes instead of a push per byte
    // and a varint loop per length (this was most of the encoder's instructions).
    if size < 0x80 && !key.is_empty() {
        out.reserve(2 + size);
        out.extend_from_slice(&[field, size as u8, key::KV_KEY, key.len() as u8]);
        out.extend_from_slice(key.as_bytes());
        match value {
            Value::String(text) => {
                let text = text.as_str();
                out.extend_from_slice(&[
                    key::KV_VALUE,
                    value_size as u8,
                    key::ANY_STRING,
                    text.len() as u8,
                ]);
                out.extend_from_slice(text.as_bytes());
            }
            Value::I64(number) => {
                out.extend_from_slice(&[key::KV_VALUE, value_size as u8, key::ANY_INT]);
                put_varint(out, *number as u64);
            }
            other => {
                out.extend_from_slice(&[key::KV_VALUE, value_size as u8]);
                put_any_value(out, other);
            }
        }
        return;
    }
    out.push(field);
    put_varint(out, size as u64);
    put_str(out, key::KV_KEY, key);
    out.push(key::KV_VALUE);
    put_varint(out, value_size as u64);
    put_any_value(out, value);
}

/// The body of an `AnyValue`.
fn put_any_value(out: &mut Vec<u8>, value: &Value) {
    match value {
        Value::Bool(value) => put_bool(out, *value),
        Value::I64(value) => put_int(out, *value),
        Value::F64(value) => put_double(out, *value),
        Value::String(value) => put_string_value(out, value.as_str()),
        Value::Array(array) => {
            out.push(key::ANY_ARRAY);
            put_varint(out, array_size(array) as u64);
            match array {
                Array::Bool(values) => {
                    for value in values {
                        out.extend_from_slice(&[key::ARRAY_VALUES, 2]);
                        put_bool(out, *value);
                    }
                }
                Array::I64(values) => {
                    for value in values {
                        out.push(key::ARRAY_VALUES);
                        put_varint(out, 1 + varint_len(*value as u64) as u64);
                        put_int(out, *value);
                    }
                }
                Array::F64(values) => {
                    for value in values {
                        out.extend_from_slice(&[key::ARRAY_VALUES, 9]);
                        put_double(out, *value);
                    }
                }
                Array::String(values) => {
                    for value in values {
                        out.push(key::ARRAY_VALUES);
                        put_varint(out, len_field(value.as_str().len()) as u64);
                        put_string_value(out, value.as_str());
                    }
                }
                _ => {}
            }
        }
        other => put_string_value(out, &other.as_str()),
    }
}

#[inline]
fn put_bool(out: &mut Vec<u8>, value: bool) {
    out.extend_from_slice(&[key::ANY_BOOL, u8::from(value)]);
}

#[inline]
fn put_int(out: &mut Vec<u8>, value: i64) {
    out.push(key::ANY_INT);
    // int64: negative values are ten-byte varints of their two's complement.
    put_varint(out, value as u64);
}

#[inline]
fn put_double(out: &mut Vec<u8>, value: f64) {
    out.push(key::ANY_DOUBLE);
    out.extend_from_slice(&value.to_le_bytes());
}

/// A oneof string member: written even when empty.
#[inline]
fn put_string_value(out: &mut Vec<u8>, value: &str) {
    out.push(key::ANY_STRING);
    put_varint(out, value.len() as u64);
    out.extend_from_slice(value.as_bytes());
}

/// The body of a `Span` (its key and length are the caller's).
fn put_span(out: &mut Vec<u8>, span: &SpanData) {
    let context = &span.span_context;
    out.extend_from_slice(&[key::SPAN_TRACE_ID, 16]);
    out.extend_from_slice(&context.trace_id().to_bytes());
    out.extend_from_slice(&[key::SPAN_SPAN_ID, 8]);
    out.extend_from_slice(&context.span_id().to_bytes());
    put_trace_state(out, key::SPAN_TRACE_STATE, context.trace_state());
    // An invalid parent id means no parent: opentelemetry-proto sends an empty field.
    if span.parent_span_id != SpanId::INVALID {
        out.extend_from_slice(&[key::SPAN_PARENT_SPAN_ID, 8]);
        out.extend_from_slice(&span.parent_span_id.to_bytes());
    }
    put_str(out, key::SPAN_NAME, &span.name);
    out.push(key::SPAN_KIND);
    put_varint(out, kind_value(&span.span_kind));
    put_fixed64(out, key::SPAN_START, nanos(span.start_time));
    put_fixed64(out, key::SPAN_END, nanos(span.end_time));
    for kv in &span.attributes {
        put_key_value(out, key::SPAN_ATTRIBUTES, kv.key.as_str(), &kv.value);
    }
    put_varint_field(
        out,
        key::SPAN_DROPPED_ATTRIBUTES,
        u64::from(span.dropped_attributes_count),
    );
    for event in span.events.iter() {
        out.push(key::SPAN_EVENTS);
        put_varint(out, event_size(event) as u64);
        put_fixed64(out, key::EVENT_TIME, nanos(event.timestamp));
        put_str(out, key::EVENT_NAME, &event.name);
        for kv in &event.attributes {
            put_key_value(out, key::EVENT_ATTRIBUTES, kv.key.as_str(), &kv.value);
        }
        put_varint_field(
            out,
            key::EVENT_DROPPED_ATTRIBUTES,
            u64::from(event.dropped_attributes_count),
        );
    }
    put_varint_field(
        out,
        key::SPAN_DROPPED_EVENTS,
        u64::from(span.events.dropped_count),
    );
    for link in span.links.iter() {
        let context = &link.span_context;
        out.push(key::SPAN_LINKS);
        put_varint(out, link_size(link) as u64);
        out.extend_from_slice(&[key::LINK_TRACE_ID, 16]);
        out.extend_from_slice(&context.trace_id().to_bytes());
        out.extend_from_slice(&[key::LINK_SPAN_ID, 8]);
        out.extend_from_slice(&context.span_id().to_bytes());
        put_trace_state(out, key::LINK_TRACE_STATE, context.trace_state());
        for kv in &link.attributes {
            put_key_value(out, key::LINK_ATTRIBUTES, kv.key.as_str(), &kv.value);
        }
        put_varint_field(
            out,
            key::LINK_DROPPED_ATTRIBUTES,
            u64::from(link.dropped_attributes_count),
        );
        out.push(key::LINK_FLAGS);
        out.extend_from_slice(
            &flags(context.trace_flags().to_u8(), context.is_remote()).to_le_bytes(),
        );
    }
    put_varint_field(
        out,
        key::SPAN_DROPPED_LINKS,
        u64::from(span.links.dropped_count),
    );
    // Status is an optional message opentelemetry-proto always sets.
    out.push(key::SPAN_STATUS);
    put_varint(out, status_size(&span.status) as u64);
    match &span.status {
        Status::Unset => {}
        Status::Ok => out.extend_from_slice(&[key::STATUS_CODE, 1]),
        Status::Error { description } => {
            put_str(out, key::STATUS_MESSAGE, description);
            out.extend_from_slice(&[key::STATUS_CODE, 2]);
        }
    }
    // Field 16, so last (prost writes fields in field-number order).
    out.extend_from_slice(&key::SPAN_FLAGS);
    out.extend_from_slice(
        &flags(context.trace_flags().to_u8(), span.parent_span_is_remote).to_le_bytes(),
    );
}

/// W3C trace flags plus the OTLP bits saying whether the parent (or linked span) is remote, as
/// opentelemetry-proto's `build_span_flags` sets them: "known" always, "remote" when it is.
#[inline]
fn flags(trace_flags: u8, remote: bool) -> u32 {
    let mut flags = u32::from(trace_flags) | FLAG_HAS_IS_REMOTE;
    if remote {
        flags |= FLAG_IS_REMOTE;
    }
    flags
}

#[cfg(test)]
mod tests {
    use opentelemetry::StringValue;

    use super::*;

    #[test]
    fn varint_lengths_match_the_encoding() {
        for value in [
            0,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX >> 1,
            u64::MAX,
        ] {
            let mut out = Vec::new();
            put_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "{value}");
        }
    }

    /// Attributes whose message is just below, at and above 128 bytes (one-byte lengths or not)
    /// are the bytes prost writes for opentelemetry-proto's `KeyValue`.
    #[test]
    fn attributes_around_one_byte_lengths_encode_like_prost() {
        use opentelemetry_proto::tonic::common::v1 as proto;
        use prost::Message as _;

        for key_len in [0, 1, 30, 126, 127, 128, 200] {
            for value_len in (0..8).chain(90..140) {
                let name = "k".repeat(key_len);
                let values = [
                    Value::from("v".repeat(value_len)),
                    Value::I64(-(value_len as i64)),
                    Value::I64(value_len as i64 * 1_000_000_007),
                    Value::Bool(value_len % 2 == 0),
                    Value::F64(value_len as f64),
                    Value::Array(Array::String(vec![StringValue::from(
                        "a".repeat(value_len),
                    )])),
                ];
                for value in values {
                    let mut ours = Vec::new();
                    put_key_value(&mut ours, key::SPAN_ATTRIBUTES, &name, &value);
                    let message = proto::KeyValue {
                        key: name.clone(),
                        value: Some(proto::AnyValue::from(value.clone())),
                        ..Default::default()
                    };
                    let mut prost = vec![key::SPAN_ATTRIBUTES];
                    message.encode_length_delimited(&mut prost).unwrap();
                    assert_eq!(ours, prost, "key {key_len} bytes, value {value:?}");
                }
            }
        }
    }

    #[test]
    fn flags_carry_the_remote_bits() {
        assert_eq!(flags(0, false), 0x100);
        assert_eq!(flags(1, false), 0x101);
        assert_eq!(flags(1, true), 0x301);
    }
}
