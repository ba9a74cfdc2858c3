//! Turns an HTTP exchange seen on a connection into an OpenTelemetry span, per the stable HTTP
//! semantic conventions: SERVER spans for requests a process read, CLIENT spans for requests
//! it wrote.
//!
//! Trace context:
//! * a SERVER request with valid context (W3C or B3) joins that trace; its parent is the
//!   remote span, and tracestate is kept. Without context it starts a new trace.
//! * a CLIENT request that carries context names the span of this very call (that is what an
//!   instrumented caller, or a user's `curl -H traceparent:`, puts there): the CLIENT span
//!   takes those ids, so the server span that reads the same header becomes its child.
//!   Without context the CLIENT span starts a new trace.
//!
//! Sampling follows the propagated sampled flag, else the configured sampler.
use std::{
    borrow::Cow,
    time::{Duration, SystemTime},
};

use opentelemetry::{
    InstrumentationScope, KeyValue, StringValue, Value,
    trace::{SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState},
};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanEvents, SpanLinks};

use crate::{
    clock::Clock,
    conntrack::Connection,
    http1::{Exchange, Message},
    sample::Sampler,
    tracecontext::{self, ContextError},
};

/// Query keys whose values are replaced by `REDACTED` in url.query and url.full. The first
/// four are the semantic conventions' list; the rest are common credentials in URLs.
const SENSITIVE_QUERY_KEYS: &[&str] = &[
    "AWSAccessKeyId",
    "Signature",
    "sig",
    "X-Goog-Signature",
    "access_token",
    "api_key",
    "apikey",
    "auth",
    "key",
    "password",
    "passwd",
    "secret",
    "token",
];

const KNOWN_METHODS: &[&str] = &[
    "CONNECT", "DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT", "TRACE",
];

/// A span and what the pipeline must count about it.
pub struct BuiltSpan {
    pub span: SpanData,
    pub sampled: bool,
    /// A context header was present but invalid (a new trace was started instead).
    pub context_error: Option<ContextError>,
}

pub struct SpanFactory {
    clock: Clock,
    ids: RandomIdGenerator,
    sampler: Sampler,
    scope: InstrumentationScope,
}

fn header<'a>(msg: &'a Message, name: &str) -> Option<&'a [u8]> {
    msg.headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_ref())
}

fn header_str<'a>(msg: &'a Message, name: &str) -> Option<&'a str> {
    header(msg, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Replaces the values of sensitive keys in a query string.
pub fn redact_query(query: &str) -> String {
    query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _))
                if SENSITIVE_QUERY_KEYS
                    .iter()
                    .any(|s| s.eq_ignore_ascii_case(k)) =>
            {
                format!("{k}=REDACTED")
            }
            _ => pair.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("&")
}

/// Path and query of a request target, which may be origin-form (`/a?b`) or absolute-form
/// (`http://host/a?b`, as sent to proxies).
fn split_target(target: &str) -> (&str, Option<&str>) {
    let path_and_query = match target.find("://") {
        Some(i) => {
            let rest = &target[i + 3..];
            rest.find('/').map_or("/", |j| &rest[j..])
        }
        None => target,
    };
    let without_fragment = path_and_query.split('#').next().unwrap_or(path_and_query);
    match without_fragment.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (without_fragment, None),
    }
}

/// host and port of a Host header value (`example.com:8080`, `[::1]:80`, `example.com`).
fn split_host(host: &str) -> (String, Option<u16>) {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[')
        && let Some((ip, after)) = rest.split_once(']')
    {
        return (
            ip.to_owned(),
            after.strip_prefix(':').and_then(|p| p.parse().ok()),
        );
    }
    match host.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') => (name.to_owned(), port.parse().ok()),
        _ => (host.to_owned(), None),
    }
}

impl SpanFactory {
    pub fn new(clock: Clock, sampler: Sampler) -> Self {
        Self {
            clock,
            ids: RandomIdGenerator::default(),
            sampler,
            scope: InstrumentationScope::builder("tracer-agent")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    fn time(&self, mono_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.clock.unix_nanos(mono_ns))
    }

    /// The span for one HTTP/1.x exchange; `kind` is SERVER when the traced process read the
    /// request, CLIENT when it wrote it.
    pub fn http1(&self, exchange: &Exchange, conn: &Connection, kind: SpanKind) -> BuiltSpan {
        let request = &exchange.request;
        let response = exchange.response.as_ref();
        let (context, context_error) = match tracecontext::extract(
            request
                .msg
                .headers
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_ref())),
        ) {
            Ok(context) => (context, None),
            Err(err) => (None, Some(err)),
        };

        let (trace_id, span_id, parent_span_id, sampled, trace_state) = match (&context, &kind) {
            (Some(ctx), SpanKind::Server) => (
                TraceId::from_bytes(ctx.trace_id.0),
                self.ids.new_span_id(),
                SpanId::from_bytes(ctx.span_id.0),
                ctx.sampled,
                ctx.tracestate
                    .as_ref()
                    .and_then(|ts| {
                        TraceState::from_key_value(
                            ts.entries().iter().map(|(k, v)| (k.as_str(), v.as_str())),
                        )
                        .ok()
                    })
                    .unwrap_or_default(),
            ),
            (Some(ctx), _) => (
                TraceId::from_bytes(ctx.trace_id.0),
                SpanId::from_bytes(ctx.span_id.0),
                SpanId::INVALID,
                ctx.sampled,
                TraceState::default(),
            ),
            (None, _) => {
                let trace_id = self.ids.new_trace_id();
                let sampled = self.sampler.should_sample(&trace_id.to_bytes(), None);
                (
                    trace_id,
                    self.ids.new_span_id(),
                    SpanId::INVALID,
                    sampled,
                    TraceState::default(),
                )
            }
        };
        // A propagated decision is honoured through the configured sampler (parentbased_*
        // follows it; always_off/traceidratio may still drop).
        let sampled = match &context {
            // B3 senders may leave the decision to the receiver.
            Some(ctx) if ctx.sampling_deferred => {
                self.sampler.should_sample(&trace_id.to_bytes(), None)
            }
            Some(_) => self
                .sampler
                .should_sample(&trace_id.to_bytes(), Some(sampled)),
            None => sampled,
        };

        let method_original = request.method.as_str();
        // Methods and span names come from closed sets, so they need no allocation.
        let method: &'static str = KNOWN_METHODS
            .iter()
            .find(|m| **m == method_original)
            .copied()
            .unwrap_or("_OTHER");
        let name = if method == "_OTHER" { "HTTP" } else { method };
        let mut attributes = Vec::with_capacity(16);
        attributes.push(KeyValue::new("http.request.method", method));
        if method == "_OTHER" {
            attributes.push(KeyValue::new(
                "http.request.method_original",
                method_original.to_owned(),
            ));
        }
        let (path, query) = split_target(&request.target);
        let query = query.map(redact_query);
        let host = header_str(&request.msg, "host").map(split_host);
        let local = conn.local;
        let remote = conn.remote;
        let text = &conn.text;
        let shared = |s: &Option<std::sync::Arc<str>>| s.clone().map(StringValue::from);
        let version = format!("1.{}", request.version);
        // TLS connections carry the plaintext the OpenSSL uprobes captured.
        let scheme = if conn.tls { "https" } else { "http" };

        match kind {
            SpanKind::Server => {
                attributes.push(KeyValue::new("url.path", path.to_owned()));
                if let Some(query) = &query {
                    attributes.push(KeyValue::new("url.query", query.clone()));
                }
                attributes.push(KeyValue::new("url.scheme", scheme));
                let (address, port) = match &host {
                    Some((name, port)) => (
                        Some(StringValue::from(name.clone())),
                        port.or(local.map(|a| a.port())),
                    ),
                    None => (shared(&text.local_ip), local.map(|a| a.port())),
                };
                if let Some(address) = address {
                    attributes.push(KeyValue::new("server.address", address));
                }
                if let Some(port) = port {
                    attributes.push(KeyValue::new("server.port", i64::from(port)));
                }
                if let Some(ip) = shared(&text.remote_ip) {
                    attributes.push(KeyValue::new("client.address", ip));
                }
            }
            _ => {
                let (address, port) = match &host {
                    Some((name, port)) => (
                        Some(StringValue::from(name.clone())),
                        port.or(remote.map(|a| a.port())),
                    ),
                    None => (shared(&text.remote_ip), remote.map(|a| a.port())),
                };
                let authority = header_str(&request.msg, "host")
                    .map(str::trim)
                    .or(text.remote.as_deref())
                    .unwrap_or_default();
                let mut full = format!("{scheme}://{authority}{path}");
                if let Some(query) = &query {
                    full.push('?');
                    full.push_str(query);
                }
                attributes.push(KeyValue::new("url.full", full));
                if let Some(address) = address {
                    attributes.push(KeyValue::new("server.address", address));
                }
                if let Some(port) = port {
                    attributes.push(KeyValue::new("server.port", i64::from(port)));
                }
            }
        }
        if let (Some(ip), Some(remote)) = (shared(&text.remote_ip), remote) {
            attributes.push(KeyValue::new("network.peer.address", ip));
            attributes.push(KeyValue::new("network.peer.port", i64::from(remote.port())));
        }
        attributes.push(KeyValue::new("network.protocol.version", version));
        if let Some(agent) = header_str(&request.msg, "user-agent") {
            attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
        }
        if let Some(id) = header_str(&request.msg, "x-request-id") {
            attributes.push(KeyValue::new(
                "http.request.header.x-request-id",
                Value::Array(vec![opentelemetry::StringValue::from(id.to_owned())].into()),
            ));
        }
        if request.msg.body_bytes > 0 {
            attributes.push(KeyValue::new(
                "http.request.body.size",
                request.msg.body_bytes as i64,
            ));
        }

        let mut status = Status::Unset;
        match response {
            Some(response) => {
                attributes.push(KeyValue::new(
                    "http.response.status_code",
                    i64::from(response.status),
                ));
                if response.msg.body_bytes > 0 {
                    attributes.push(KeyValue::new(
                        "http.response.body.size",
                        response.msg.body_bytes as i64,
                    ));
                }
                // 5xx is an error on both sides; 4xx only for the client, whose request failed.
                let error = response.status >= 500
                    || (response.status >= 400 && !matches!(kind, SpanKind::Server));
                if error {
                    attributes.push(KeyValue::new("error.type", response.status.to_string()));
                    status = Status::error("");
                }
            }
            None => {
                attributes.push(KeyValue::new("error.type", "_OTHER"));
                status = Status::error("no response: the connection closed or capture lost it");
            }
        }

        let start = request.msg.start_ns;
        let end = response
            .map_or(request.msg.end_ns, |r| r.msg.end_ns)
            .max(start);
        let flags = if sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        let span = SpanData {
            span_context: SpanContext::new(trace_id, span_id, flags, false, trace_state),
            parent_span_id,
            parent_span_is_remote: parent_span_id != SpanId::INVALID,
            span_kind: kind,
            name: Cow::Borrowed(name),
            start_time: self.time(start),
            end_time: self.time(end),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        };
        BuiltSpan {
            span,
            sampled,
            context_error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_sensitive_query_values() {
        assert_eq!(
            redact_query("a=1&sig=abc&Signature=x&token=t&b"),
            "a=1&sig=REDACTED&Signature=REDACTED&token=REDACTED&b"
        );
        assert_eq!(redact_query(""), "");
    }

    #[test]
    fn splits_targets() {
        assert_eq!(split_target("/a/b?x=1#f"), ("/a/b", Some("x=1")));
        assert_eq!(split_target("/"), ("/", None));
        assert_eq!(split_target("http://h:1/p?q"), ("/p", Some("q")));
        assert_eq!(split_target("http://h"), ("/", None));
        assert_eq!(split_target("*"), ("*", None));
    }

    #[test]
    fn splits_hosts() {
        assert_eq!(
            split_host("example.com:8080"),
            ("example.com".into(), Some(8080))
        );
        assert_eq!(split_host("example.com"), ("example.com".into(), None));
        assert_eq!(split_host("[::1]:80"), ("::1".into(), Some(80)));
        assert_eq!(split_host("::1"), ("::1".into(), None));
    }
}
