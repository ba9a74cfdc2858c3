//! Header fields as the HTTP/1 and HTTP/2 parsers hand them on: a name and the raw value.
//!
//! Values share the captured buffer (`Bytes`). Names are borrowed from a static list when they
//! are one of the common ones, spelled as sent, and only allocated otherwise: under load the
//! agent parses a dozen fields per exchange, and allocating then freeing each name was a visible
//! part of its CPU. [`Text`] does the same for the request line's method and target.
use std::{borrow::Cow, fmt, ops::Deref};

use bytes::{Bytes, BytesMut};

/// A field name as sent (case kept).
pub type FieldName = Cow<'static, str>;

/// One header or trailer field.
pub type Field = (FieldName, Bytes);

/// UTF-8 text sharing the captured buffer it was parsed from (a request's method and target):
/// cloning it (the linking stage keeps both while the call is in flight) is a reference count,
/// not an allocation.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct Text(Bytes);

impl Text {
    /// `bytes` if they are UTF-8.
    pub fn from_utf8(bytes: Bytes) -> Option<Self> {
        // The ASCII check first: a few instructions on the short texts of a start line, where
        // the full validation costs about 85.
        (bytes.is_ascii() || std::str::from_utf8(&bytes).is_ok()).then_some(Self(bytes))
    }

    /// `sub`, a part of `block`, sharing its buffer.
    pub fn share(block: &Bytes, sub: &str) -> Self {
        Self(share(block, sub.as_bytes()))
    }

    pub fn as_str(&self) -> &str {
        // SAFETY: every constructor checked (or was given) UTF-8, and the bytes never change.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Text {
    fn from(s: &str) -> Self {
        Self(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<String> for Text {
    fn from(s: String) -> Self {
        Self(Bytes::from(s))
    }
}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_str() == other
    }
}

impl PartialEq<&str> for Text {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `sub` as a zero-copy slice of `block` (copied if it is not inside it).
pub fn share(block: &Bytes, sub: &[u8]) -> Bytes {
    let offset = (sub.as_ptr() as usize).checked_sub(block.as_ptr() as usize);
    match offset {
        Some(start)
            if start
                .checked_add(sub.len())
                .is_some_and(|end| end <= block.len()) =>
        {
            block.slice(start..start + sub.len())
        }
        _ => Bytes::copy_from_slice(sub),
    }
}

/// Bytes of an arena chunk.
const ARENA_CHUNK: usize = 4096;
/// Longer copies get an allocation of their own rather than a quarter of a chunk or more.
const ARENA_MAX_COPY: usize = 1024;

/// Copies of captured bytes that must outlive their segment (header sections), packed into
/// shared chunks: one allocation per chunk, where a copy of its own costs two (the copy, and
/// the shared header `Bytes` adds when it is first sliced into field values). A chunk is freed
/// once the last copy in it is dropped, so a long-lived copy keeps at most one chunk alive.
#[derive(Debug, Default)]
pub struct Arena {
    chunk: BytesMut,
}

impl Arena {
    pub fn copy(&mut self, bytes: &[u8]) -> Bytes {
        if bytes.len() > ARENA_MAX_COPY {
            return Bytes::copy_from_slice(bytes);
        }
        if self.chunk.capacity() < bytes.len() {
            self.chunk = BytesMut::with_capacity(ARENA_CHUNK);
        }
        self.chunk.extend_from_slice(bytes);
        self.chunk.split().freeze()
    }
}

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

    #[test]
    fn arena_copies_share_chunks_and_outlive_them() {
        let mut arena = Arena::default();
        let a = arena.copy(b"GET / HTTP/1.1\r\n\r\n");
        let b = arena.copy(b"HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(&a[..], b"GET / HTTP/1.1\r\n\r\n");
        assert_eq!(&b[..], b"HTTP/1.1 200 OK\r\n\r\n");
        // Consecutive in one chunk.
        assert_eq!(a.as_ptr() as usize + a.len(), b.as_ptr() as usize);
        let big = vec![b'x'; ARENA_MAX_COPY + 1];
        assert_eq!(arena.copy(&big), big);
        let mut kept = Vec::new();
        for i in 0..100u8 {
            kept.push((i, arena.copy(&[i; 200])));
        }
        drop(arena);
        for (i, copy) in kept {
            assert_eq!(copy, vec![i; 200]);
        }
    }

    #[test]
    fn text_is_utf8_only() {
        let text = Text::from_utf8(Bytes::from_static(b"/caf\xc3\xa9?q=1")).expect("UTF-8");
        assert_eq!(text, "/café?q=1");
        assert_eq!(text.len(), 10);
        assert!(Text::from_utf8(Bytes::from_static(b"/\xff")).is_none());
        assert_eq!(Text::from("GET"), Text::from(String::from("GET")));
    }
}
