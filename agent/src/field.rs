//! Header fields as the HTTP/1 and HTTP/2 parsers hand them on: a name and the raw value.
//!
//! Values share the captured buffer (`Bytes`). Names are borrowed from a static list when they
//! are one of the common ones, spelled as sent, and only allocated otherwise: under load the
//! agent parses a dozen fields per exchange, and allocating then freeing each name was a visible
//! part of its CPU.
use std::borrow::Cow;

use bytes::Bytes;

/// A field name as sent (case kept).
pub type FieldName = Cow<'static, str>;

/// One header or trailer field.
pub type Field = (FieldName, Bytes);

/// `raw` as a field name, without allocating when it is a common one.
pub fn name(raw: &str) -> FieldName {
    match common(raw) {
        Some(known) => Cow::Borrowed(known),
        None => Cow::Owned(raw.to_owned()),
    }
}

/// The static copy of `raw`, if it is a name that most requests or responses carry, in the
/// spellings clients and servers actually use (Title-Case on HTTP/1, lower case on HTTP/2).
fn common(raw: &str) -> Option<&'static str> {
    Some(match raw {
        "Host" => "Host",
        "host" => "host",
        "User-Agent" => "User-Agent",
        "user-agent" => "user-agent",
        "Accept" => "Accept",
        "accept" => "accept",
        "Accept-Encoding" => "Accept-Encoding",
        "accept-encoding" => "accept-encoding",
        "Accept-Language" => "Accept-Language",
        "accept-language" => "accept-language",
        "Accept-Ranges" => "Accept-Ranges",
        "accept-ranges" => "accept-ranges",
        "Connection" => "Connection",
        "connection" => "connection",
        "Keep-Alive" => "Keep-Alive",
        "Content-Type" => "Content-Type",
        "Content-type" => "Content-type",
        "content-type" => "content-type",
        "Content-Length" => "Content-Length",
        "Content-length" => "Content-length",
        "content-length" => "content-length",
        "Content-Encoding" => "Content-Encoding",
        "content-encoding" => "content-encoding",
        "Transfer-Encoding" => "Transfer-Encoding",
        "transfer-encoding" => "transfer-encoding",
        "Cache-Control" => "Cache-Control",
        "cache-control" => "cache-control",
        "Date" => "Date",
        "date" => "date",
        "Server" => "Server",
        "server" => "server",
        "Last-Modified" => "Last-Modified",
        "last-modified" => "last-modified",
        "ETag" => "ETag",
        "etag" => "etag",
        "Vary" => "Vary",
        "vary" => "vary",
        "Location" => "Location",
        "location" => "location",
        "Expect" => "Expect",
        "Upgrade" => "Upgrade",
        "HTTP2-Settings" => "HTTP2-Settings",
        "traceparent" => "traceparent",
        "tracestate" => "tracestate",
        "Traceparent" => "Traceparent",
        "Tracestate" => "Tracestate",
        "b3" => "b3",
        "X-B3-TraceId" => "X-B3-TraceId",
        "X-B3-SpanId" => "X-B3-SpanId",
        "X-B3-ParentSpanId" => "X-B3-ParentSpanId",
        "X-B3-Sampled" => "X-B3-Sampled",
        "x-b3-traceid" => "x-b3-traceid",
        "x-b3-spanid" => "x-b3-spanid",
        "x-b3-parentspanid" => "x-b3-parentspanid",
        "x-b3-sampled" => "x-b3-sampled",
        "X-Request-Id" => "X-Request-Id",
        "x-request-id" => "x-request-id",
        "X-Forwarded-For" => "X-Forwarded-For",
        "x-forwarded-for" => "x-forwarded-for",
        "X-Real-IP" => "X-Real-IP",
        "te" => "te",
        "grpc-status" => "grpc-status",
        "grpc-message" => "grpc-message",
        "grpc-timeout" => "grpc-timeout",
        "grpc-encoding" => "grpc-encoding",
        "grpc-accept-encoding" => "grpc-accept-encoding",
        ":method" => ":method",
        ":scheme" => ":scheme",
        ":path" => ":path",
        ":authority" => ":authority",
        ":status" => ":status",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_names_are_borrowed_and_others_kept_as_sent() {
        assert!(matches!(
            name("Content-Length"),
            Cow::Borrowed("Content-Length")
        ));
        assert!(matches!(
            name("content-length"),
            Cow::Borrowed("content-length")
        ));
        // Case is kept exactly, whether borrowed or not.
        assert!(matches!(name("CONTENT-LENGTH"), Cow::Owned(ref s) if s == "CONTENT-LENGTH"));
        assert!(matches!(name("X-Custom"), Cow::Owned(ref s) if s == "X-Custom"));
        assert_eq!(name(""), "");
    }
}
