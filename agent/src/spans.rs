//! Turns an HTTP exchange seen on a connection into an OpenTelemetry span, per the stable HTTP
//! semantic conventions: SERVER spans for requests a process read, CLIENT spans for requests
//! it wrote.
//!
//! Which trace a span joins and which span is its parent is decided by the linking stage
//! (link.rs); this module only describes the exchange.
use std::{
    borrow::Cow,
    time::{Duration, SystemTime},
};

use opentelemetry::{
    InstrumentationScope, KeyValue, StringValue, Value,
    trace::{SpanContext, SpanKind, Status, TraceFlags},
};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};

use crate::{
    clock::Clock,
    conntrack::Connection,
    http1::{Exchange, Message},
    http2::{H2Message, Http2Exchange},
    link::{CallIds, LINK_ATTRIBUTE},
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

pub struct SpanFactory {
    clock: Clock,
    scope: InstrumentationScope,
    rpc: RpcConventions,
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

/// The length of a query pair's key (before its first `=`) when its value is to be redacted.
fn sensitive_key_len(pair: &[u8]) -> Option<usize> {
    let len = pair.iter().position(|&b| b == b'=')?;
    let key = &pair[..len];
    SENSITIVE_QUERY_KEYS
        .iter()
        .any(|s| s.as_bytes().eq_ignore_ascii_case(key))
        .then_some(len)
}

/// Replaces the values of sensitive keys in a query string. Most queries hold none: they come
/// back borrowed, checked without allocating (splitting and joining every query took a fifth
/// of the span's instructions).
pub fn redact_query(query: &str) -> Cow<'_, str> {
    let mut pairs = query.as_bytes().split(|&b| b == b'&');
    if !pairs.any(|pair| sensitive_key_len(pair).is_some()) {
        return Cow::Borrowed(query);
    }
    let mut redacted = String::with_capacity(query.len() + 8);
    // `&` and `=` are ASCII, so the pairs and keys are str slices of `query`.
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            redacted.push('&');
        }
        match sensitive_key_len(pair.as_bytes()) {
            Some(len) => {
                redacted.push_str(&pair[..len]);
                redacted.push_str("=REDACTED");
            }
            None => redacted.push_str(pair),
        }
    }
    Cow::Owned(redacted)
}

/// Path and query of a request target, which may be origin-form (`/a?b`) or absolute-form
/// (`http://host/a?b`, as sent to proxies).
///
/// Byte searches rather than `str` patterns, which set up a searcher on every call (the one
/// for "://" alone took about 180 instructions per span). The bytes searched for are ASCII, so
/// every index found is a char boundary.
fn split_target(target: &str) -> (&str, Option<&str>) {
    let bytes = target.as_bytes();
    // Origin-form starts with `/` (RFC 9112 §3.2.1); only other targets can have a scheme, so
    // a URL in the query (`/login?next=http://x/y`) stays in the query.
    let scheme_end = match bytes.first() {
        Some(b'/') => None,
        _ => memchr::memchr_iter(b':', bytes).find(|&i| bytes[i + 1..].starts_with(b"//")),
    };
    let path_and_query = match scheme_end {
        Some(i) => {
            let rest = &target[i + 3..];
            memchr::memchr(b'/', rest.as_bytes()).map_or("/", |j| &rest[j..])
        }
        None => target,
    };
    let without_fragment = match memchr::memchr(b'#', path_and_query.as_bytes()) {
        Some(i) => &path_and_query[..i],
        None => path_and_query,
    };
    match memchr::memchr(b'?', without_fragment.as_bytes()) {
        Some(i) => (&without_fragment[..i], Some(&without_fragment[i + 1..])),
        None => (without_fragment, None),
    }
}

/// host and port of a Host header value (`example.com:8080`, `[::1]:80`, `example.com`). The
/// host is borrowed: it is copied once, into the attribute.
fn split_host(host: &str) -> (&str, Option<u16>) {
    let host = host.trim();
    if let Some(rest) = host.strip_prefix('[')
        && let Some((ip, after)) = rest.split_once(']')
    {
        return (ip, after.strip_prefix(':').and_then(|p| p.parse().ok()));
    }
    // Host values are short: a plain byte loop is cheaper than a call to memchr.
    let bytes = host.as_bytes();
    match bytes.iter().rposition(|&b| b == b':') {
        Some(i) if !bytes[..i].contains(&b':') => (&host[..i], host[i + 1..].parse().ok()),
        _ => (host, None),
    }
}

impl SpanFactory {
    pub fn new(clock: Clock) -> Self {
        Self {
            clock,
            rpc: RpcConventions::default(),
            scope: InstrumentationScope::builder("tracer-agent")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    /// Which RPC semantic conventions gRPC spans follow.
    pub fn with_rpc_conventions(mut self, rpc: RpcConventions) -> Self {
        self.rpc = rpc;
        self
    }

    fn time(&self, mono_ns: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_nanos(self.clock.unix_nanos(mono_ns))
    }

    /// The span for one HTTP/1.x exchange; `kind` is SERVER when the traced process read the
    /// request, CLIENT when it wrote it. The linking stage chose its ids.
    pub fn http1(
        &self,
        exchange: &Exchange,
        conn: &Connection,
        kind: SpanKind,
        ids: &CallIds,
    ) -> SpanData {
        let request = &exchange.request;
        let response = exchange.response.as_ref();
        let view = HttpView {
            method: &request.method,
            target: &request.target,
            scheme: if conn.tls { "https" } else { "http" },
            authority: header_str(&request.msg, "host"),
            user_agent: header_str(&request.msg, "user-agent"),
            request_id: header_str(&request.msg, "x-request-id"),
            version: if request.version == 0 { "1.0" } else { "1.1" },
            status: response.map(|r| r.status),
            request_body: request.msg.body_bytes,
            response_body: response.map_or(0, |r| r.msg.body_bytes),
            start_ns: request.msg.start_ns,
            end_ns: response.map_or(request.msg.end_ns, |r| r.msg.end_ns),
            no_response: "no response: the connection closed or capture lost it",
        };
        self.http(&view, conn, kind, ids)
    }

    /// The span for one HTTP/2 stream: an RPC span for gRPC, else an HTTP span.
    pub fn http2(
        &self,
        exchange: &Http2Exchange,
        conn: &Connection,
        kind: SpanKind,
        ids: &CallIds,
    ) -> SpanData {
        let request = &exchange.request;
        let response = exchange.response.as_ref();
        let field = |name: &str| h2_str(request, name);
        let grpc = field("content-type").is_some_and(|t| t.starts_with("application/grpc"));
        if grpc {
            return self.grpc(exchange, conn, kind, ids);
        }
        let view = HttpView {
            method: field(":method").unwrap_or("_OTHER"),
            target: field(":path").unwrap_or("/"),
            scheme: match field(":scheme") {
                Some("https") => "https",
                Some(_) => "http",
                None if conn.tls => "https",
                None => "http",
            },
            authority: field(":authority").or_else(|| field("host")),
            user_agent: field("user-agent"),
            request_id: field("x-request-id"),
            version: "2",
            status: response.and_then(H2Message::status),
            request_body: request.body_bytes,
            response_body: response.map_or(0, |r| r.body_bytes),
            start_ns: request.start_ns,
            end_ns: response.map_or(request.end_ns, |r| r.end_ns),
            no_response: if exchange.reset.is_some() {
                "the stream was reset before a response"
            } else {
                "no response: the connection closed or capture lost it"
            },
        };
        let mut span = self.http(&view, conn, kind, ids);
        self.h2_extras(exchange, &mut span);
        span
    }

    /// RST_STREAM and undecodable headers, on any HTTP/2 span.
    fn h2_extras(&self, exchange: &Http2Exchange, span: &mut SpanData) {
        if let Some(code) = exchange.reset {
            span.attributes.push(KeyValue::new(
                "http2.rst_stream.error_code",
                i64::from(code),
            ));
        }
        if exchange.incomplete_headers {
            // Fields the agent could not decode (HPACK state lost before the agent attached or
            // to a capture gap): the span may lack attributes, never carries wrong ones.
            span.attributes
                .push(KeyValue::new("tracer_agent.incomplete_headers", true));
        }
    }

    /// A gRPC call, per the RPC semantic conventions (`self.rpc` picks the generation).
    fn grpc(
        &self,
        exchange: &Http2Exchange,
        conn: &Connection,
        kind: SpanKind,
        ids: &CallIds,
    ) -> SpanData {
        let request = &exchange.request;
        let response = exchange.response.as_ref();
        let path = h2_str(request, ":path").unwrap_or("");
        let full = path.strip_prefix('/').unwrap_or(path);
        let (service, method) = full.rsplit_once('/').unwrap_or((full, ""));
        let full_method = if full.is_empty() { "_OTHER" } else { full };
        let code = exchange.grpc_status();
        let mut attributes = Vec::with_capacity(16);
        if self.rpc.old() {
            attributes.push(KeyValue::new("rpc.system", "grpc"));
            if !service.is_empty() {
                attributes.push(KeyValue::new("rpc.service", service.to_owned()));
            }
            if !method.is_empty() {
                attributes.push(KeyValue::new("rpc.method", method.to_owned()));
            }
            if let Some(code) = code {
                attributes.push(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            }
        }
        if self.rpc.stable() {
            attributes.push(KeyValue::new("rpc.system.name", "grpc"));
            if !self.rpc.old() {
                attributes.push(KeyValue::new("rpc.method", full_method.to_owned()));
            }
            if let Some(code) = code {
                attributes.push(KeyValue::new(
                    "rpc.response.status_code",
                    grpc_code_name(code),
                ));
            }
        }
        self.peer_attributes(
            &mut attributes,
            conn,
            &kind,
            h2_str(request, ":authority").map(split_host),
        );
        attributes.push(KeyValue::new("network.protocol.name", "http"));
        attributes.push(KeyValue::new("network.protocol.version", "2"));
        // Client: every code but OK is an error; server: only the codes that mean the server
        // failed (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS).
        let status = match code {
            Some(0) => Status::Unset,
            Some(code)
                if kind == SpanKind::Server && !matches!(code, 2 | 4 | 12 | 13 | 14 | 15) =>
            {
                Status::Unset
            }
            Some(code) => {
                attributes.push(KeyValue::new("error.type", grpc_code_name(code)));
                Status::error("")
            }
            None => {
                attributes.push(KeyValue::new("error.type", "_OTHER"));
                Status::error(if exchange.reset.is_some() {
                    "the stream was reset before a grpc-status"
                } else {
                    "no grpc-status: the connection closed or capture lost it"
                })
            }
        };
        let start = request.start_ns;
        let end = response.map_or(request.end_ns, |r| r.end_ns).max(start);
        let mut span = self.finish(
            Cow::Owned(full_method.to_owned()),
            kind,
            ids,
            attributes,
            status,
            start,
            end,
        );
        self.h2_extras(exchange, &mut span);
        span
    }

    /// server.address/port, client.address and network.peer.* for either side.
    fn peer_attributes(
        &self,
        attributes: &mut Vec<KeyValue>,
        conn: &Connection,
        kind: &SpanKind,
        host: Option<(&str, Option<u16>)>,
    ) {
        let text = &conn.text;
        let shared = |s: &Option<std::sync::Arc<str>>| s.clone().map(StringValue::from);
        // The server is us (SERVER) or the remote end (CLIENT).
        let (server_ip, server_addr) = match kind {
            SpanKind::Server => (&text.local_ip, conn.local),
            _ => (&text.remote_ip, conn.remote),
        };
        let server_port = server_addr.map(|a| a.port());
        let (address, port) = match host {
            Some((name, port)) => (
                Some(StringValue::from(name.to_owned())),
                port.or(server_port),
            ),
            None => (shared(server_ip), server_port),
        };
        if let Some(address) = address {
            attributes.push(KeyValue::new("server.address", address));
        }
        if let Some(port) = port {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        if *kind == SpanKind::Server
            && let Some(ip) = shared(&text.remote_ip)
        {
            attributes.push(KeyValue::new("client.address", ip));
        }
        if let (Some(ip), Some(remote)) = (shared(&text.remote_ip), conn.remote) {
            attributes.push(KeyValue::new("network.peer.address", ip));
            attributes.push(KeyValue::new("network.peer.port", i64::from(remote.port())));
        }
    }

    /// An HTTP span of any version.
    fn http(
        &self,
        view: &HttpView<'_>,
        conn: &Connection,
        kind: SpanKind,
        ids: &CallIds,
    ) -> SpanData {
        // Methods and span names come from closed sets, so they need no allocation.
        let method: &'static str = KNOWN_METHODS
            .iter()
            .find(|m| **m == view.method)
            .copied()
            .unwrap_or("_OTHER");
        let name = if method == "_OTHER" { "HTTP" } else { method };
        let mut attributes = Vec::with_capacity(16);
        attributes.push(KeyValue::new("http.request.method", method));
        if method == "_OTHER" {
            attributes.push(KeyValue::new(
                "http.request.method_original",
                view.method.to_owned(),
            ));
        }
        let (path, query) = split_target(view.target);
        let query = query.map(redact_query);
        if kind == SpanKind::Server {
            attributes.push(KeyValue::new("url.path", path.to_owned()));
            if let Some(query) = query {
                attributes.push(KeyValue::new("url.query", query.into_owned()));
            }
            attributes.push(KeyValue::new("url.scheme", view.scheme));
        } else {
            let authority = view
                .authority
                .map(str::trim)
                .or(conn.text.remote.as_deref())
                .unwrap_or_default();
            let mut full = format!("{}://{authority}{path}", view.scheme);
            if let Some(query) = &query {
                full.push('?');
                full.push_str(query);
            }
            attributes.push(KeyValue::new("url.full", full));
        }
        self.peer_attributes(&mut attributes, conn, &kind, view.authority.map(split_host));
        attributes.push(KeyValue::new("network.protocol.version", view.version));
        if let Some(agent) = view.user_agent {
            attributes.push(KeyValue::new("user_agent.original", agent.to_owned()));
        }
        if let Some(id) = view.request_id {
            attributes.push(KeyValue::new(
                "http.request.header.x-request-id",
                Value::Array(vec![opentelemetry::StringValue::from(id.to_owned())].into()),
            ));
        }
        if view.request_body > 0 {
            attributes.push(KeyValue::new(
                "http.request.body.size",
                view.request_body as i64,
            ));
        }
        let mut status = Status::Unset;
        match view.status {
            Some(code) => {
                attributes.push(KeyValue::new("http.response.status_code", i64::from(code)));
                if view.response_body > 0 {
                    attributes.push(KeyValue::new(
                        "http.response.body.size",
                        view.response_body as i64,
                    ));
                }
                // 5xx is an error on both sides; 4xx only for the client, whose request failed.
                let error = code >= 500 || (code >= 400 && kind != SpanKind::Server);
                if error {
                    attributes.push(KeyValue::new("error.type", code.to_string()));
                    status = Status::error("");
                }
            }
            None => {
                attributes.push(KeyValue::new("error.type", "_OTHER"));
                status = Status::error(view.no_response);
            }
        }
        let end = view.end_ns.max(view.start_ns);
        self.finish(
            Cow::Borrowed(name),
            kind,
            ids,
            attributes,
            status,
            view.start_ns,
            end,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        name: Cow<'static, str>,
        kind: SpanKind,
        ids: &CallIds,
        mut attributes: Vec<KeyValue>,
        status: Status,
        start: u64,
        end: u64,
    ) -> SpanData {
        attributes.push(KeyValue::new(LINK_ATTRIBUTE, ids.link.as_str()));
        let flags = if ids.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanData {
            span_context: SpanContext::new(
                ids.trace_id,
                ids.span_id,
                flags,
                false,
                ids.trace_state.clone(),
            ),
            parent_span_id: ids.parent_span_id,
            parent_span_is_remote: ids.parent_is_remote,
            span_kind: kind,
            name,
            start_time: self.time(start),
            end_time: self.time(end),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.scope.clone(),
        }
    }
}

/// What an HTTP span needs, whatever the version.
struct HttpView<'a> {
    method: &'a str,
    target: &'a str,
    scheme: &'static str,
    /// Host (HTTP/1) or :authority (HTTP/2).
    authority: Option<&'a str>,
    user_agent: Option<&'a str>,
    request_id: Option<&'a str>,
    version: &'static str,
    status: Option<u16>,
    request_body: u64,
    response_body: u64,
    start_ns: u64,
    end_ns: u64,
    /// The status message when no response came.
    no_response: &'static str,
}

fn h2_str<'a>(msg: &'a H2Message, name: &str) -> Option<&'a str> {
    msg.headers
        .iter()
        .find(|(k, _)| k == name)
        .and_then(|(_, v)| std::str::from_utf8(v).ok())
}

/// gRPC status code names (grpc/doc/statuscodes.md).
pub fn grpc_code_name(code: u32) -> &'static str {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    usize::try_from(code)
        .ok()
        .and_then(|i| NAMES.get(i))
        .copied()
        .unwrap_or("_OTHER")
}

/// Which generation of the RPC semantic conventions to emit, from
/// OTEL_SEMCONV_STABILITY_OPT_IN (`rpc`: the stable ones only; `rpc/dup`: both; default: the
/// older experimental ones, as OpenTelemetry instrumentations do).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RpcConventions {
    #[default]
    Old,
    Stable,
    Both,
}

impl RpcConventions {
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let value = lookup("OTEL_SEMCONV_STABILITY_OPT_IN").unwrap_or_default();
        let values: Vec<&str> = value.split(',').map(str::trim).collect();
        if values.contains(&"rpc/dup") {
            Self::Both
        } else if values.contains(&"rpc") {
            Self::Stable
        } else {
            Self::Old
        }
    }

    fn old(self) -> bool {
        self != Self::Stable
    }

    fn stable(self) -> bool {
        self != Self::Old
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The straightforward versions of the searches above (`str` patterns, owned results): the
    /// byte searches must agree with them on any input.
    mod reference {
        use super::SENSITIVE_QUERY_KEYS;

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

        pub fn split_target(target: &str) -> (&str, Option<&str>) {
            let scheme_end = if target.starts_with('/') {
                None
            } else {
                target.find("://")
            };
            let path_and_query = match scheme_end {
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

        pub fn split_host(host: &str) -> (String, Option<u16>) {
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
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        #[test]
        fn byte_searches_agree_with_str_patterns(
            text in "(sig|SiG|token|apikey|key|://|80|[a-z0-9:/?#&=\\[\\]. \t]|é|\u{a0}){0,16}"
        ) {
            prop_assert_eq!(&*redact_query(&text), reference::redact_query(&text));
            prop_assert_eq!(split_target(&text), reference::split_target(&text));
            let (host, port) = split_host(&text);
            prop_assert_eq!((host.to_owned(), port), reference::split_host(&text));
        }
    }

    #[test]
    fn queries_without_secrets_are_not_copied() {
        assert!(matches!(redact_query("id=42&b&=x"), Cow::Borrowed(_)));
        assert!(matches!(redact_query("a=1&token=t"), Cow::Owned(_)));
    }

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
        // A URL inside an origin-form target's query is not its scheme.
        assert_eq!(
            split_target("/redirect?to=http://x/y#z"),
            ("/redirect", Some("to=http://x/y"))
        );
    }

    #[test]
    fn splits_hosts() {
        assert_eq!(split_host("example.com:8080"), ("example.com", Some(8080)));
        assert_eq!(split_host("example.com"), ("example.com", None));
        assert_eq!(split_host("[::1]:80"), ("::1", Some(80)));
        assert_eq!(split_host("::1"), ("::1", None));
    }
}
