//! Distributed-trace context carried in request headers (HTTP/1, HTTP/2, gRPC metadata):
//! reading it from traffic captured from uninstrumented processes, and writing it back out for
//! header injection.
//!
//! Formats:
//! * W3C Trace Context `traceparent` / `tracestate`: the Level 1 Recommendation
//!   (<https://www.w3.org/TR/trace-context-1/>, sections cited as "W3C §x.y"), reading future
//!   `traceparent` versions as that document prescribes. Of the Level 2 draft's changes, two
//!   matter to a receiver: its relaxed `tracestate` key grammar is opt-in through [`KeyGrammar`],
//!   and its new flag bit (random trace id) is kept as received like every other flag bit.
//! * Zipkin B3, as one `b3` header or several `X-B3-*` headers
//!   (<https://github.com/openzipkin/b3-propagation>, cited as "B3").
//!
//! Everything here is a pure function of bytes straight off the network: no I/O, and no panics
//! on any input. A header that is present but unusable yields a [`ContextError`] that the agent
//! counts before starting a new trace.
//!
//! Precedence in [`extract`]: a valid `traceparent` wins; otherwise a valid `b3` header; otherwise
//! valid `X-B3-*` headers (B3: "The single-header variant takes precedence over the multiple
//! header one"). An invalid header of a higher-precedence format does not hide a valid one of a
//! lower-precedence format.

use std::fmt;

/// Bit 0 of W3C `trace-flags` (W3C §3.2.2.5.1).
pub const FLAG_SAMPLED: u8 = 0x01;

/// Length of a version-00 `traceparent`, which is also the minimum for later versions
/// (W3C §3.2.4).
const TRACEPARENT_LEN: usize = 55;

/// `tracestate` holds at most 32 list members (W3C §3.3.1.1).
const TRACESTATE_MAX_MEMBERS: usize = 32;

/// The largest `tracestate` key and value (W3C §3.3.1.3).
const TRACESTATE_MAX_KEY: usize = 256;
const TRACESTATE_MAX_VALUE: usize = 256;
/// The parts of a Level 1 multi-tenant key, `tenant-id "@" system-id` (W3C §3.3.1.3.1).
const TRACESTATE_MAX_TENANT: usize = 241;
const TRACESTATE_MAX_SYSTEM: usize = 14;

/// Entries longer than this are the first to go when a `tracestate` must be shortened
/// (W3C §3.3.1.5).
const TRACESTATE_LONG_ENTRY: usize = 128;

/// A 128-bit trace id. All zeros is the invalid id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A 64-bit span id. All zeros is the invalid id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

impl TraceId {
    /// Whether this id may be used: W3C and B3 both reserve all zeros.
    pub fn is_valid(&self) -> bool {
        self.0 != [0; 16]
    }

    /// 32 lowercase hex characters, as W3C and B3 write it.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// Exactly 32 lowercase hex characters. Uppercase is rejected because both W3C (HEXDIGLC)
    /// and B3 ("lower-hex") allow only lowercase. All zeros parses; check [`Self::is_valid`].
    pub fn from_hex(hex: &str) -> Option<Self> {
        decode_hex(hex.as_bytes()).ok().map(Self)
    }
}

impl SpanId {
    /// Whether this id may be used: W3C and B3 both reserve all zeros.
    pub fn is_valid(&self) -> bool {
        self.0 != [0; 8]
    }

    /// 16 lowercase hex characters.
    pub fn to_hex(&self) -> String {
        encode_hex(&self.0)
    }

    /// Exactly 16 lowercase hex characters; see [`TraceId::from_hex`].
    pub fn from_hex(hex: &str) -> Option<Self> {
        decode_hex(hex.as_bytes()).ok().map(Self)
    }
}

impl fmt::Display for TraceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

impl fmt::Display for SpanId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// The context of the remote caller, as read from a request's headers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpanContext {
    pub trace_id: TraceId,
    /// The remote parent's span id: W3C `parent-id`, B3 `SpanId` (the caller's span; B3's
    /// `ParentSpanId` is that span's own parent and is only validated).
    pub span_id: SpanId,
    pub sampled: bool,
    /// W3C: as received; bits other than [`FLAG_SAMPLED`] are kept but not interpreted.
    /// B3: [`FLAG_SAMPLED`] when `sampled`, else 0.
    pub trace_flags: u8,
    /// W3C only, validated; `None` when absent, empty or discarded as invalid.
    pub tracestate: Option<TraceState>,
    pub format: ContextFormat,
    /// B3 "debug" flag (d / X-B3-Flags: 1) implies sampled.
    pub debug: bool,
    /// B3 only: the sender left the sampling decision to the receiver (no sampling state, no
    /// debug flag), so `sampled` is false without meaning "deny". Always false for W3C, whose
    /// sampled bit is always a decision.
    pub sampling_deferred: bool,
}

/// The header format a [`SpanContext`] was read from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContextFormat {
    W3C,
    B3Single,
    B3Multi,
}

/// A B3 sampling state other than "defer" (which is the absence of one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SamplingDecision {
    Deny,
    Accept,
    /// Forced tracing; implies accept.
    Debug,
}

/// Which `tracestate` key grammar to accept.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum KeyGrammar {
    /// Level 1 Recommendation: `simple-key` (lcalpha first, at most 256) or `multi-tenant-key`
    /// (`tenant@system`, tenant at most 241 starting with lcalpha or a digit, system at most 14
    /// starting with lcalpha).
    #[default]
    Level1,
    /// Level 2 draft: lcalpha or digit first, then up to 255 key characters where `@` is an
    /// ordinary character. A superset of Level 1.
    Level2,
}

/// Why a header was not used. Each becomes a counted, named event in the agent
/// (see [`ContextError::label`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    #[error("context header value is empty")]
    Empty,
    #[error("context header value contains non-ASCII bytes")]
    NonAscii,
    #[error("context header field has the wrong length")]
    WrongLength,
    #[error("context header value is malformed")]
    Malformed,
    #[error("context header uses uppercase hex; only lowercase is allowed")]
    UppercaseHex,
    #[error("traceparent version ff is forbidden")]
    InvalidVersion,
    #[error("trace id is all zeros")]
    AllZeroTraceId,
    #[error("span id is all zeros")]
    AllZeroSpanId,
    #[error("more than one traceparent header")]
    Duplicate,
    #[error("B3 sampling state is not recognised")]
    InvalidSamplingState,
    #[error("B3 parent span id is not 16 lowercase hex characters")]
    InvalidParentSpanId,
    #[error("B3 header carries only a sampling decision ({0:?}), no trace or span id")]
    SamplingOnly(SamplingDecision),
    #[error("B3 headers without a trace id")]
    MissingTraceId,
    #[error("B3 headers without a span id")]
    MissingSpanId,
    #[error("tracestate without a traceparent")]
    TracestateWithoutTraceparent,
    #[error("tracestate has more than 32 list members")]
    TracestateTooManyMembers,
    #[error("tracestate list member is not key=value")]
    TracestateMalformedMember,
    #[error("tracestate key is invalid")]
    TracestateInvalidKey,
    #[error("tracestate value is invalid")]
    TracestateInvalidValue,
    #[error("tracestate key appears twice")]
    TracestateDuplicateKey,
}

impl ContextError {
    /// A stable snake_case name for metrics labels.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::NonAscii => "non_ascii",
            Self::WrongLength => "wrong_length",
            Self::Malformed => "malformed",
            Self::UppercaseHex => "uppercase_hex",
            Self::InvalidVersion => "invalid_version",
            Self::AllZeroTraceId => "all_zero_trace_id",
            Self::AllZeroSpanId => "all_zero_span_id",
            Self::Duplicate => "duplicate",
            Self::InvalidSamplingState => "invalid_sampling_state",
            Self::InvalidParentSpanId => "invalid_parent_span_id",
            Self::SamplingOnly(_) => "sampling_only",
            Self::MissingTraceId => "missing_trace_id",
            Self::MissingSpanId => "missing_span_id",
            Self::TracestateWithoutTraceparent => "tracestate_without_traceparent",
            Self::TracestateTooManyMembers => "tracestate_too_many_members",
            Self::TracestateMalformedMember => "tracestate_malformed_member",
            Self::TracestateInvalidKey => "tracestate_invalid_key",
            Self::TracestateInvalidValue => "tracestate_invalid_value",
            Self::TracestateDuplicateKey => "tracestate_duplicate_key",
        }
    }
}

/// A validated W3C `tracestate`: at most 32 `key=value` entries, keys unique, in received order
/// (leftmost first).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TraceState {
    entries: Vec<(String, String)>,
}

impl TraceState {
    /// The value for `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Entries in header order, as `(key, value)`.
    pub fn entries(&self) -> &[(String, String)] {
        &self.entries
    }

    /// Entries in header order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The header value, entries joined by `,` without optional whitespace.
    pub fn to_header(&self) -> String {
        join_entries(self.entries.iter())
    }

    /// The header value cut to at most `max_len` bytes the way W3C §3.3.1.5 prescribes: only
    /// whole entries are dropped, entries longer than 128 characters first, then entries from
    /// the end (the rightmost are the oldest).
    pub fn to_header_within(&self, max_len: usize) -> String {
        let lens: Vec<usize> = self
            .entries
            .iter()
            .map(|(k, v)| k.len() + 1 + v.len())
            .collect();
        let mut keep = vec![true; lens.len()];
        let mut sum: usize = lens.iter().sum();
        let mut count = lens.len();
        for long_only in [true, false] {
            for (kept, &len) in keep.iter_mut().zip(&lens).rev() {
                // Entries are joined by single commas.
                if sum + count.saturating_sub(1) <= max_len {
                    break;
                }
                if *kept && (!long_only || len > TRACESTATE_LONG_ENTRY) {
                    *kept = false;
                    sum -= len;
                    count -= 1;
                }
            }
        }
        join_entries(
            self.entries
                .iter()
                .zip(&keep)
                .filter_map(|(entry, &kept)| kept.then_some(entry)),
        )
    }
}

fn join_entries<'a>(entries: impl Iterator<Item = &'a (String, String)>) -> String {
    let mut out = String::new();
    for (i, (k, v)) in entries.enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// Everything [`extract_detailed`] found, including rejections that did not stop a context from
/// being used, so that each can be counted.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extraction {
    /// The context to continue, if any header yielded one.
    pub context: Option<SpanContext>,
    /// Why the `traceparent` header(s) were rejected.
    pub traceparent_error: Option<ContextError>,
    /// Why `tracestate` was discarded: invalid next to a valid `traceparent` (the context is
    /// kept without it, W3C §3.3), or present without any `traceparent` (W3C §4.2).
    pub tracestate_error: Option<ContextError>,
    /// Why B3 was rejected: the `b3` header's error if there was one, else the `X-B3-*` error.
    /// B3 is only examined when W3C yielded no context.
    pub b3_error: Option<ContextError>,
}

impl Extraction {
    /// The summary [`extract`] returns: the context if any; otherwise the rejection of the
    /// highest-precedence format present; otherwise `Ok(None)`.
    pub fn into_result(self) -> Result<Option<SpanContext>, ContextError> {
        match (self.context, self.traceparent_error, self.b3_error) {
            (Some(context), _, _) => Ok(Some(context)),
            (None, Some(error), _) | (None, None, Some(error)) => Err(error),
            (None, None, None) => Ok(None),
        }
    }
}

/// Headers as captured: (name, value) pairs in wire order; names may be any case.
/// Returns Ok(None) when no context header is present, Ok(Some(ctx)) for valid context,
/// Err(reason) when a context header is present but invalid (the caller then starts a new trace
/// and counts the reason). W3C takes precedence over B3 when both are valid; an invalid
/// traceparent with a valid B3 header falls back to B3.
///
/// A lone `tracestate` is not context (W3C §4.2) and gives `Ok(None)`. A `b3` header with only a
/// sampling decision gives `Err(ContextError::SamplingOnly(_))`: there is nothing to continue.
/// Use [`extract_detailed`] to also count rejections that did not decide the result.
pub fn extract<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
) -> Result<Option<SpanContext>, ContextError> {
    extract_detailed(headers, KeyGrammar::default()).into_result()
}

/// [`extract`], reporting every rejection and accepting `tracestate` keys per `grammar`.
pub fn extract_detailed<'a>(
    headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    grammar: KeyGrammar,
) -> Extraction {
    let mut traceparent: Option<&[u8]> = None;
    let mut traceparent_repeated = false;
    let mut tracestate: Vec<&[u8]> = Vec::new();
    let mut b3: Option<&[u8]> = None;
    let mut multi = B3MultiHeaders::default();
    for (name, value) in headers {
        let Some(kind) = classify(name) else {
            continue;
        };
        // B3: "When extracting state headers, the first value wins."
        let first = |slot: &mut Option<&'a [u8]>| {
            slot.get_or_insert(value);
        };
        match kind {
            HeaderKind::Traceparent => {
                traceparent_repeated |= traceparent.is_some();
                first(&mut traceparent);
            }
            HeaderKind::Tracestate => tracestate.push(value),
            HeaderKind::B3 => first(&mut b3),
            HeaderKind::B3TraceId => first(&mut multi.trace_id),
            HeaderKind::B3SpanId => first(&mut multi.span_id),
            HeaderKind::B3ParentSpanId => first(&mut multi.parent_span_id),
            HeaderKind::B3Sampled => first(&mut multi.sampled),
            HeaderKind::B3Flags => first(&mut multi.flags),
        }
    }

    let mut out = Extraction::default();
    match traceparent {
        // W3C §3.2 defines a single value; the trace-context test suite expects two headers to
        // be ignored rather than either one picked.
        Some(_) if traceparent_repeated => out.traceparent_error = Some(ContextError::Duplicate),
        Some(value) => match parse_traceparent(value) {
            Ok(mut context) => {
                // W3C §3.3: tracestate is only parsed after traceparent succeeded, and its
                // failure does not affect traceparent.
                if !tracestate.is_empty() {
                    match parse_tracestate_with(&tracestate, grammar) {
                        Ok(state) if state.is_empty() => {}
                        Ok(state) => context.tracestate = Some(state),
                        Err(error) => out.tracestate_error = Some(error),
                    }
                }
                out.context = Some(context);
                return out;
            }
            Err(error) => out.traceparent_error = Some(error),
        },
        None if !tracestate.is_empty() => {
            out.tracestate_error = Some(ContextError::TracestateWithoutTraceparent);
        }
        None => {}
    }

    if let Some(value) = b3 {
        match parse_b3_single(value) {
            Ok(context) => {
                out.context = Some(context);
                return out;
            }
            Err(error) => out.b3_error = Some(error),
        }
    }
    if !multi.is_empty() {
        match parse_b3_multi(&multi) {
            Ok(context) => out.context = Some(context),
            Err(error) => {
                out.b3_error.get_or_insert(error);
            }
        }
    }
    out
}

#[derive(Clone, Copy)]
enum HeaderKind {
    Traceparent,
    Tracestate,
    B3,
    B3TraceId,
    B3SpanId,
    B3ParentSpanId,
    B3Sampled,
    B3Flags,
}

/// Header names are case-insensitive (W3C §3.2.1, §3.3.1; HTTP); gRPC metadata is lowercase.
fn classify(name: &str) -> Option<HeaderKind> {
    const NAMES: [(&str, HeaderKind); 8] = [
        ("traceparent", HeaderKind::Traceparent),
        ("tracestate", HeaderKind::Tracestate),
        ("b3", HeaderKind::B3),
        ("x-b3-traceid", HeaderKind::B3TraceId),
        ("x-b3-spanid", HeaderKind::B3SpanId),
        ("x-b3-parentspanid", HeaderKind::B3ParentSpanId),
        ("x-b3-sampled", HeaderKind::B3Sampled),
        ("x-b3-flags", HeaderKind::B3Flags),
    ];
    NAMES
        .iter()
        .find(|(known, _)| name.eq_ignore_ascii_case(known))
        .map(|&(_, kind)| kind)
}

/// Parses one `traceparent` value (W3C §3.2).
///
/// Version 00 must be exactly `00-{32 hex}-{16 hex}-{2 hex}`. A later version (not `ff`) is read
/// the same way from its first 55 characters, which must be followed by `-` or nothing; the rest
/// is ignored (W3C §3.2.4). Hex is lowercase only, surrounding spaces and tabs are ignored.
pub fn parse_traceparent(value: &[u8]) -> Result<SpanContext, ContextError> {
    let value = trim_ows(value);
    if value.is_empty() {
        return Err(ContextError::Empty);
    }
    // Only the part this version defines is examined; a future version's extra fields are
    // opaque (W3C §3.2.4: "MUST NOT parse or assume anything about unknown fields").
    if !value[..value.len().min(TRACEPARENT_LEN)].is_ascii() {
        return Err(ContextError::NonAscii);
    }
    // "When the version prefix cannot be parsed (it's not 2 hex characters followed by a dash
    // (-)), the implementation should restart the trace."
    let (Some(version_hex), Some(b'-')) = (value.get(..2), value.get(2)) else {
        return Err(ContextError::Malformed);
    };
    let [version] = decode_hex::<1>(version_hex).map_err(HexError::into_context)?;
    match version {
        0xff => return Err(ContextError::InvalidVersion),
        0x00 if value.len() != TRACEPARENT_LEN => return Err(ContextError::WrongLength),
        _ if value.len() < TRACEPARENT_LEN => return Err(ContextError::WrongLength),
        _ if value.get(TRACEPARENT_LEN).is_some_and(|&b| b != b'-') => {
            return Err(ContextError::Malformed);
        }
        _ => {}
    }
    let (Some(trace_hex), Some(b'-'), Some(span_hex), Some(b'-'), Some(flags_hex)) = (
        value.get(3..35),
        value.get(35),
        value.get(36..52),
        value.get(52),
        value.get(53..55),
    ) else {
        return Err(ContextError::Malformed);
    };
    let trace_id = TraceId(decode_hex(trace_hex).map_err(HexError::into_context)?);
    let span_id = SpanId(decode_hex(span_hex).map_err(HexError::into_context)?);
    let [trace_flags] = decode_hex::<1>(flags_hex).map_err(HexError::into_context)?;
    check_ids(trace_id, span_id)?;
    Ok(SpanContext {
        trace_id,
        span_id,
        sampled: trace_flags & FLAG_SAMPLED != 0,
        trace_flags,
        tracestate: None,
        format: ContextFormat::W3C,
        debug: false,
        sampling_deferred: false,
    })
}

/// Parses the `tracestate` header lines of one request, in wire order, with the Level 1 key
/// grammar. Lines combine as if joined by commas (W3C §3.3.1.1, RFC 7230 §3.2.2).
///
/// Empty and whitespace-only members are skipped and do not count towards the limit of 32.
/// Any invalid member, a duplicate key or a 33rd member rejects the whole header: W3C §4.3 lets
/// an unparseable `tracestate` be discarded, and the W3C test suite expects exactly that.
pub fn parse_tracestate(values: &[&[u8]]) -> Result<TraceState, ContextError> {
    parse_tracestate_with(values, KeyGrammar::Level1)
}

/// [`parse_tracestate`] with a chosen key grammar.
pub fn parse_tracestate_with(
    values: &[&[u8]],
    grammar: KeyGrammar,
) -> Result<TraceState, ContextError> {
    let mut entries: Vec<(String, String)> = Vec::new();
    let members = values.iter().flat_map(|line| line.split(|&b| b == b','));
    for member in members {
        // "Spaces and horizontal tabs surrounding list-members are ignored."
        let member = trim_ows(member);
        if member.is_empty() {
            continue;
        }
        if entries.len() == TRACESTATE_MAX_MEMBERS {
            return Err(ContextError::TracestateTooManyMembers);
        }
        let Some(eq) = member.iter().position(|&b| b == b'=') else {
            return Err(ContextError::TracestateMalformedMember);
        };
        let (key, value) = member.split_at(eq);
        let value = value.get(1..).unwrap_or_default();
        let key_ok = match grammar {
            KeyGrammar::Level1 => is_level1_key(key),
            KeyGrammar::Level2 => is_level2_key(key),
        };
        if !key_ok {
            return Err(ContextError::TracestateInvalidKey);
        }
        if !is_tracestate_value(value) {
            return Err(ContextError::TracestateInvalidValue);
        }
        // W3C §3.3.1.4: "Only one entry per key is allowed".
        if entries.iter().any(|(k, _)| k.as_bytes() == key) {
            return Err(ContextError::TracestateDuplicateKey);
        }
        entries.push((ascii_string(key), ascii_string(value)));
    }
    Ok(TraceState { entries })
}

/// `simple-key = lcalpha 0*255( lcalpha / DIGIT / "_" / "-"/ "*" / "/" )`, or
/// `multi-tenant-key = tenant-id "@" system-id` with
/// `tenant-id = ( lcalpha / DIGIT ) 0*240( ... )` and `system-id = lcalpha 0*13( ... )`.
fn is_level1_key(key: &[u8]) -> bool {
    match key.iter().position(|&b| b == b'@') {
        None => is_key_part(key, TRACESTATE_MAX_KEY, false),
        Some(at) => {
            let (tenant, system) = key.split_at(at);
            let system = system.get(1..).unwrap_or_default();
            // A second `@` fails here, as `@` is not a key character in either part.
            is_key_part(tenant, TRACESTATE_MAX_TENANT, true)
                && is_key_part(system, TRACESTATE_MAX_SYSTEM, false)
        }
    }
}

/// `key = ( lcalpha / DIGIT ) 0*255 ( keychar )` where `keychar` includes `@` (Level 2).
fn is_level2_key(key: &[u8]) -> bool {
    match key.split_first() {
        Some((&first, rest)) => {
            key.len() <= TRACESTATE_MAX_KEY
                && (first.is_ascii_lowercase() || first.is_ascii_digit())
                && rest.iter().all(|&b| is_key_char(b) || b == b'@')
        }
        None => false,
    }
}

fn is_key_part(part: &[u8], max_len: usize, digit_first: bool) -> bool {
    match part.split_first() {
        Some((&first, rest)) => {
            part.len() <= max_len
                && (first.is_ascii_lowercase() || (digit_first && first.is_ascii_digit()))
                && rest.iter().all(|&b| is_key_char(b))
        }
        None => false,
    }
}

fn is_key_char(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-' | b'*' | b'/')
}

/// `value = 0*255(chr) nblk-chr`, `nblk-chr = %x21-2B / %x2D-3C / %x3E-7E`, `chr = %x20 / nblk-chr`.
fn is_tracestate_value(value: &[u8]) -> bool {
    let nblk = |b: u8| matches!(b, 0x21..=0x2b | 0x2d..=0x3c | 0x3e..=0x7e);
    match value.split_last() {
        Some((&last, rest)) => {
            value.len() <= TRACESTATE_MAX_VALUE
                && nblk(last)
                && rest.iter().all(|&b| b == b' ' || nblk(b))
        }
        None => false,
    }
}

/// Parses a `b3` single-header value: `{TraceId}-{SpanId}[-{SamplingState}[-{ParentSpanId}]]`,
/// trace id 32 or 16 lowercase hex (16 is left-padded with zeros to 128 bits), span id 16,
/// sampling state `0`, `1` or `d`, parent span id 16 (checked, then dropped).
///
/// A value that is only a sampling state (`b3: 0`, `1` or `d`) is valid B3 but carries nothing
/// to continue: it is reported as `Err(ContextError::SamplingOnly(decision))`, so the caller
/// starts a new trace and may still honour the decision.
pub fn parse_b3_single(value: &[u8]) -> Result<SpanContext, ContextError> {
    let value = header_value(value)?;
    let mut fields = value.split(|&b| b == b'-');
    let trace = fields.next().unwrap_or_default();
    let Some(span) = fields.next() else {
        if trace.len() == 1 {
            let decision = sampling_state(trace).ok_or(ContextError::InvalidSamplingState)?;
            return Err(ContextError::SamplingOnly(decision));
        }
        // Report a bad trace id before the missing span id.
        b3_trace_id(trace)?;
        return Err(ContextError::MissingSpanId);
    };
    let sampling = fields.next();
    let parent = fields.next();
    if fields.next().is_some() {
        return Err(ContextError::Malformed);
    }
    let trace_id = b3_trace_id(trace)?;
    let span_id = b3_span_id(span)?;
    let decision = match sampling {
        Some(state) => Some(sampling_state(state).ok_or(ContextError::InvalidSamplingState)?),
        None => None,
    };
    if let Some(parent) = parent {
        b3_parent_span_id(parent)?;
    }
    b3_context(trace_id, span_id, decision, ContextFormat::B3Single)
}

/// The raw values of the `X-B3-*` headers of one request (the first of each name).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct B3MultiHeaders<'a> {
    pub trace_id: Option<&'a [u8]>,
    pub span_id: Option<&'a [u8]>,
    pub parent_span_id: Option<&'a [u8]>,
    pub sampled: Option<&'a [u8]>,
    pub flags: Option<&'a [u8]>,
}

impl B3MultiHeaders<'_> {
    pub fn is_empty(&self) -> bool {
        self.trace_id.is_none()
            && self.span_id.is_none()
            && self.parent_span_id.is_none()
            && self.sampled.is_none()
            && self.flags.is_none()
    }
}

/// Parses B3 multiple headers. `X-B3-TraceId` and `X-B3-SpanId` are required; `X-B3-Sampled` is
/// `1`/`0`, or `true`/`false` (B3: "a lenient implementation may accept them"); `X-B3-Flags: 1`
/// is debug and any other flags value is ignored. Sampled or flags without any id is
/// `SamplingOnly`, as for the single header.
pub fn parse_b3_multi(headers: &B3MultiHeaders<'_>) -> Result<SpanContext, ContextError> {
    // Only `1` means anything; other flags values are ignored, malformed ones included.
    let debug = headers.flags.is_some_and(|flags| trim_ows(flags) == b"1");
    let sampled = match headers.sampled {
        Some(sampled) => Some(match header_value(sampled)? {
            b"1" => true,
            b"0" => false,
            other if other.eq_ignore_ascii_case(b"true") => true,
            other if other.eq_ignore_ascii_case(b"false") => false,
            _ => return Err(ContextError::InvalidSamplingState),
        }),
        None => None,
    };
    // B3: "Debug implies an accept decision".
    let decision = match (debug, sampled) {
        (true, _) => Some(SamplingDecision::Debug),
        (false, Some(true)) => Some(SamplingDecision::Accept),
        (false, Some(false)) => Some(SamplingDecision::Deny),
        (false, None) => None,
    };
    let (Some(trace), Some(span)) = (headers.trace_id, headers.span_id) else {
        return Err(
            match (
                headers.trace_id,
                headers.span_id,
                headers.parent_span_id,
                decision,
            ) {
                // B3: "valid to propagate only a reject sampling decision (X-B3-Sampled: 0)".
                (None, None, None, Some(decision)) => ContextError::SamplingOnly(decision),
                (None, ..) => ContextError::MissingTraceId,
                (Some(_), ..) => ContextError::MissingSpanId,
            },
        );
    };
    let trace_id = b3_trace_id(header_value(trace)?)?;
    let span_id = b3_span_id(header_value(span)?)?;
    if let Some(parent) = headers.parent_span_id {
        b3_parent_span_id(trim_ows(parent))?;
    }
    b3_context(trace_id, span_id, decision, ContextFormat::B3Multi)
}

fn b3_context(
    trace_id: TraceId,
    span_id: SpanId,
    decision: Option<SamplingDecision>,
    format: ContextFormat,
) -> Result<SpanContext, ContextError> {
    check_ids(trace_id, span_id)?;
    let (sampled, debug) = match decision {
        None | Some(SamplingDecision::Deny) => (false, false),
        Some(SamplingDecision::Accept) => (true, false),
        Some(SamplingDecision::Debug) => (true, true),
    };
    Ok(SpanContext {
        trace_id,
        span_id,
        sampled,
        trace_flags: if sampled { FLAG_SAMPLED } else { 0 },
        tracestate: None,
        format,
        debug,
        sampling_deferred: decision.is_none(),
    })
}

/// B3: "32 or 16 lower-hex characters"; a 64-bit id becomes the low half of a 128-bit one.
fn b3_trace_id(hex: &[u8]) -> Result<TraceId, ContextError> {
    match hex.len() {
        32 => Ok(TraceId(decode_hex(hex).map_err(HexError::into_context)?)),
        16 => {
            let low: [u8; 8] = decode_hex(hex).map_err(HexError::into_context)?;
            let mut id = [0; 16];
            for (dst, src) in id.iter_mut().skip(8).zip(low) {
                *dst = src;
            }
            Ok(TraceId(id))
        }
        _ => Err(ContextError::WrongLength),
    }
}

fn b3_span_id(hex: &[u8]) -> Result<SpanId, ContextError> {
    Ok(SpanId(decode_hex(hex).map_err(HexError::into_context)?))
}

/// The parent span id is only validated: the caller's span is what a server continues. All
/// zeros is accepted, as B3 does not forbid it and the value is not used.
fn b3_parent_span_id(hex: &[u8]) -> Result<(), ContextError> {
    decode_hex::<8>(hex)
        .map(drop)
        .map_err(|_| ContextError::InvalidParentSpanId)
}

fn sampling_state(state: &[u8]) -> Option<SamplingDecision> {
    match state {
        b"0" => Some(SamplingDecision::Deny),
        b"1" => Some(SamplingDecision::Accept),
        b"d" => Some(SamplingDecision::Debug),
        _ => None,
    }
}

fn check_ids(trace_id: TraceId, span_id: SpanId) -> Result<(), ContextError> {
    if !trace_id.is_valid() {
        Err(ContextError::AllZeroTraceId)
    } else if !span_id.is_valid() {
        Err(ContextError::AllZeroSpanId)
    } else {
        Ok(())
    }
}

/// Writes a version-00 `traceparent` with only the sampled flag, as W3C §3.2.2.5.2 requires for
/// the undefined bits. The ids are written as given; callers pass valid ones.
pub fn format_traceparent(trace_id: TraceId, span_id: SpanId, sampled: bool) -> String {
    let flags = if sampled { "01" } else { "00" };
    format!("00-{trace_id}-{span_id}-{flags}")
}

/// Writes a `b3` single-header value `{TraceId}-{SpanId}-{SamplingState}`. A trace id whose high
/// 64 bits are zero is written as 16 characters so 64-bit-only B3 peers can read it.
pub fn format_b3_single(trace_id: TraceId, span_id: SpanId, sampled: bool, debug: bool) -> String {
    let state = match (debug, sampled) {
        (true, _) => 'd',
        (false, true) => '1',
        (false, false) => '0',
    };
    let trace = match trace_id.0.split_at(8) {
        ([0, 0, 0, 0, 0, 0, 0, 0], low) => encode_hex(low),
        _ => trace_id.to_hex(),
    };
    format!("{trace}-{span_id}-{state}")
}

/// Strips optional whitespace, `OWS = *( SP / HTAB )` (RFC 7230 §3.2.3).
fn trim_ows(mut value: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = value {
        value = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = value {
        value = rest;
    }
    value
}

/// A trimmed B3 header value that is non-empty ASCII.
fn header_value(value: &[u8]) -> Result<&[u8], ContextError> {
    let value = trim_ows(value);
    if value.is_empty() {
        Err(ContextError::Empty)
    } else if !value.is_ascii() {
        Err(ContextError::NonAscii)
    } else {
        Ok(value)
    }
}

/// Only called on bytes already checked to be ASCII, for which this is exact.
fn ascii_string(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

enum HexError {
    Length,
    Uppercase,
    Invalid,
}

impl HexError {
    fn into_context(self) -> ContextError {
        match self {
            Self::Length => ContextError::WrongLength,
            Self::Uppercase => ContextError::UppercaseHex,
            Self::Invalid => ContextError::Malformed,
        }
    }
}

/// Value of each byte as a hex digit: 0..=15 for `0-9a-f`, `UPPER | value` for `A-F`, `BAD`
/// otherwise. One load per digit: parsing context headers runs on every request that carries
/// them, and the branchy `match` it replaces cost about 1,000 instructions per traceparent.
const HEX: [u8; 256] = {
    let mut table = [BAD; 256];
    let mut i = 0;
    while i < 10 {
        table[b'0' as usize + i] = i as u8;
        i += 1;
    }
    let mut i = 0;
    while i < 6 {
        table[b'a' as usize + i] = 10 + i as u8;
        table[b'A' as usize + i] = UPPER | (10 + i as u8);
        i += 1;
    }
    table
};
const UPPER: u8 = 0x10;
const BAD: u8 = 0x20;

/// Decodes exactly `2 * N` lowercase hex digits. Uppercase digits are told apart from other
/// characters so that this common interoperability bug is counted separately; a non-hex
/// character anywhere makes the whole field `Invalid`.
fn decode_hex<const N: usize>(hex: &[u8]) -> Result<[u8; N], HexError> {
    if hex.len() != 2 * N {
        return Err(HexError::Length);
    }
    let mut out = [0; N];
    let mut flags = 0;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (high, low) = (HEX[usize::from(pair[0])], HEX[usize::from(pair[1])]);
        flags |= high | low;
        *byte = ((high & 0x0f) << 4) | (low & 0x0f);
    }
    if flags & BAD != 0 {
        Err(HexError::Invalid)
    } else if flags & UPPER != 0 {
        Err(HexError::Uppercase)
    } else {
        Ok(out)
    }
}

fn encode_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8]) -> fmt::Result {
    bytes.iter().try_for_each(|b| write!(f, "{b:02x}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ContextError as E;

    const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const SPAN: &str = "00f067aa0ba902b7";
    /// The trace-context test suite's ids.
    const SUITE_TRACE: &str = "12345678901234567890123456789012";
    const SUITE_SPAN: &str = "1234567890123456";

    fn ids(context: &SpanContext) -> (String, String) {
        (context.trace_id.to_hex(), context.span_id.to_hex())
    }

    /// Expected `parse_traceparent` outcome: (trace id, span id, flags) or the error.
    type W3cOutcome = Result<(&'static str, &'static str, u8), ContextError>;

    #[test]
    fn traceparent_rules() {
        let suite = |tail: &str| format!("00-{SUITE_TRACE}-{SUITE_SPAN}-{tail}");
        let ok = |flags| Ok((SUITE_TRACE, SUITE_SPAN, flags));
        let rows: Vec<(&str, Vec<u8>, W3cOutcome)> = vec![
            // W3C §3.2.3 examples.
            (
                "spec example, sampled",
                format!("00-{TRACE}-{SPAN}-01").into(),
                Ok((TRACE, SPAN, 1)),
            ),
            (
                "spec example, not sampled",
                format!("00-{TRACE}-{SPAN}-00").into(),
                Ok((TRACE, SPAN, 0)),
            ),
            (
                "spec §3.1 example",
                b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_vec(),
                Ok(("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331", 1)),
            ),
            // §3.2.2.5: a bit field, other bits kept, sampled is bit 0 only.
            ("flags 09 kept, sampled", suite("09").into(), ok(0x09)),
            ("flags 02 kept, not sampled", suite("02").into(), ok(0x02)),
            ("flags ff kept", suite("ff").into(), ok(0xff)),
            // OWS around the value (test suite test_traceparent_ows_handling).
            ("leading space", format!(" {}", suite("01")).into(), ok(1)),
            ("leading tab", format!("\t{}", suite("01")).into(), ok(1)),
            ("trailing space", format!("{} ", suite("01")).into(), ok(1)),
            ("trailing tab", format!("{}\t", suite("01")).into(), ok(1)),
            ("both", format!("\t {} \t", suite("01")).into(), ok(1)),
            ("empty", b"".to_vec(), Err(E::Empty)),
            ("only whitespace", b" \t ".to_vec(), Err(E::Empty)),
            // HEXDIGLC only.
            (
                "uppercase trace id",
                format!("00-{}-{SPAN}-01", TRACE.to_uppercase()).into(),
                Err(E::UppercaseHex),
            ),
            (
                "uppercase parent id",
                format!("00-{TRACE}-00F067AA0BA902B7-01").into(),
                Err(E::UppercaseHex),
            ),
            ("uppercase flags", suite("0A").into(), Err(E::UppercaseHex)),
            (
                "uppercase version",
                format!("0A-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::UppercaseHex),
            ),
            (
                "uppercase next to a non-hex char is malformed",
                format!("00-A{}-{SUITE_SPAN}-01", &SUITE_TRACE[..30])
                    .replace("-A", "-A.")
                    .into(),
                Err(E::Malformed),
            ),
            // §3.2.2.1: version ff is forbidden.
            (
                "version ff",
                format!("ff-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::InvalidVersion),
            ),
            (
                "version FF",
                format!("FF-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::UppercaseHex),
            ),
            // §3.2.4: the version prefix is 2 hex characters then a dash.
            (
                "version .0",
                format!(".0-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::Malformed),
            ),
            (
                "version 0.",
                format!("0.-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::Malformed),
            ),
            (
                "version too long 000",
                format!("000-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::Malformed),
            ),
            (
                "version too long 0000",
                format!("0000-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::Malformed),
            ),
            (
                "version too short",
                format!("0-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                Err(E::Malformed),
            ),
            ("just a version", b"00".to_vec(), Err(E::Malformed)),
            // Version 00 is exactly 55 characters.
            (
                "00 with trailing dot",
                suite("01.").into(),
                Err(E::WrongLength),
            ),
            (
                "00 with future fields",
                suite("01-what-the-future-will-be-like").into(),
                Err(E::WrongLength),
            ),
            // §3.2.2.3 / §3.2.2.4: all zeros forbidden.
            (
                "trace id all zero",
                format!("00-{}-{SUITE_SPAN}-01", "0".repeat(32)).into(),
                Err(E::AllZeroTraceId),
            ),
            (
                "parent id all zero",
                format!("00-{SUITE_TRACE}-{}-01", "0".repeat(16)).into(),
                Err(E::AllZeroSpanId),
            ),
            (
                "trace id illegal first char",
                format!("00-.{}-{SUITE_SPAN}-01", &SUITE_TRACE[1..]).into(),
                Err(E::Malformed),
            ),
            (
                "trace id illegal last char",
                format!("00-{}.-{SUITE_SPAN}-01", &SUITE_TRACE[..31]).into(),
                Err(E::Malformed),
            ),
            (
                "trace id too long",
                format!("00-{SUITE_TRACE}3-{SUITE_SPAN}-01").into(),
                Err(E::WrongLength),
            ),
            (
                "trace id too short",
                format!("00-{}-{SUITE_SPAN}-01", &SUITE_TRACE[..31]).into(),
                Err(E::WrongLength),
            ),
            (
                "parent id illegal first char",
                format!("00-{SUITE_TRACE}-.{}-01", &SUITE_SPAN[1..]).into(),
                Err(E::Malformed),
            ),
            (
                "parent id illegal last char",
                format!("00-{SUITE_TRACE}-{}.-01", &SUITE_SPAN[..15]).into(),
                Err(E::Malformed),
            ),
            (
                "parent id too long",
                format!("00-{SUITE_TRACE}-{SUITE_SPAN}7-01").into(),
                Err(E::WrongLength),
            ),
            (
                "parent id too short",
                format!("00-{SUITE_TRACE}-{}-01", &SUITE_SPAN[..15]).into(),
                Err(E::WrongLength),
            ),
            (
                "fields shifted, right length",
                format!("00-{}-{SUITE_SPAN}7-01", &SUITE_TRACE[..31]).into(),
                Err(E::Malformed),
            ),
            ("flags .0", suite(".0").into(), Err(E::Malformed)),
            ("flags 0.", suite("0.").into(), Err(E::Malformed)),
            ("flags too long", suite("001").into(), Err(E::WrongLength)),
            ("flags too short", suite("1").into(), Err(E::WrongLength)),
            // §3.2.4: a higher version is read through its first four fields.
            (
                "future version cc",
                format!("cc-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                ok(1),
            ),
            (
                "future version with more fields",
                format!("cc-{SUITE_TRACE}-{SUITE_SPAN}-01-what-the-future-will-be-like").into(),
                ok(1),
            ),
            (
                "future version, flags not followed by a dash",
                format!("cc-{SUITE_TRACE}-{SUITE_SPAN}-01.what-the-future-will-be-like").into(),
                Err(E::Malformed),
            ),
            (
                "future version, unknown tail may be any bytes",
                [
                    format!("cc-{SUITE_TRACE}-{SUITE_SPAN}-01-").as_bytes(),
                    &[0xff, 0xfe][..],
                ]
                .concat(),
                ok(1),
            ),
            (
                "future version shorter than 55",
                format!("cc-{}-{SUITE_SPAN}-01", &SUITE_TRACE[..31]).into(),
                Err(E::WrongLength),
            ),
            (
                "future version, trace id too long",
                format!("cc-{SUITE_TRACE}3-{SUITE_SPAN}-01").into(),
                Err(E::Malformed),
            ),
            (
                "future version fe is not ff",
                format!("fe-{SUITE_TRACE}-{SUITE_SPAN}-01").into(),
                ok(1),
            ),
            (
                "future version still lowercase only",
                format!("01-{}-{SUITE_SPAN}-01", TRACE.to_uppercase()).into(),
                Err(E::UppercaseHex),
            ),
            (
                "future version still no zero ids",
                format!("01-{SUITE_TRACE}-{}-01", "0".repeat(16)).into(),
                Err(E::AllZeroSpanId),
            ),
            // Bytes off the wire need not be text.
            (
                "invalid UTF-8",
                [&suite("01").as_bytes()[..54], &[0xff][..]].concat(),
                Err(E::NonAscii),
            ),
            (
                "non-ASCII UTF-8",
                format!("00-{}é-{SUITE_SPAN}-01", &SUITE_TRACE[..30]).into(),
                Err(E::NonAscii),
            ),
        ];
        for (name, input, expected) in rows {
            let got = parse_traceparent(&input);
            let summary = got
                .as_ref()
                .map(|c| (ids(c), c.trace_flags))
                .map_err(|e| *e);
            let want = expected.map(|(t, s, f)| ((t.to_owned(), s.to_owned()), f));
            assert_eq!(
                summary,
                want,
                "{name}: {:?}",
                String::from_utf8_lossy(&input)
            );
            if let Ok(context) = got {
                assert_eq!(context.sampled, context.trace_flags & 1 == 1, "{name}");
                assert_eq!(context.format, ContextFormat::W3C);
                assert!(
                    !context.debug && !context.sampling_deferred && context.tracestate.is_none()
                );
            }
        }
    }

    /// Expected tracestate: entries or the error.
    type StateOutcome = Result<Vec<(String, String)>, ContextError>;

    fn entries(pairs: &[(&str, &str)]) -> StateOutcome {
        Ok(pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect())
    }

    fn numbered_lines(count: usize) -> Vec<String> {
        let members: Vec<String> = (1..=count).map(|i| format!("bar{i:02}={i:02}")).collect();
        members.chunks(10).map(|chunk| chunk.join(",")).collect()
    }

    fn tracestate_rows() -> Vec<(&'static str, Vec<String>, StateOutcome)> {
        let lines = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let key_chars = "abcdefghijklmnopqrstuvwxyz0123456789_-*/";
        let value_chars: String = (0x20u8..=0x7e)
            .filter(|b| !matches!(b, b',' | b'='))
            .map(char::from)
            .collect();
        let vendor_key = format!("{key_chars}@a-z0-9_-*/");
        let thirty_two: Vec<(String, String)> = (1..=32)
            .map(|i| (format!("bar{i:02}"), format!("{i:02}")))
            .collect();
        vec![
            // W3C §3.1 / §3.3.2 examples.
            (
                "spec example",
                lines(&["congo=t61rcWkgMzE"]),
                entries(&[("congo", "t61rcWkgMzE")]),
            ),
            (
                "spec two vendors",
                lines(&["rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"]),
                entries(&[("rojo", "00f067aa0ba902b7"), ("congo", "t61rcWkgMzE")]),
            ),
            // §3.3.1.1: lines combine in order.
            (
                "multiple lines keep order",
                lines(&["foo=1,bar=2", "rojo=1,congo=2", "baz=3"]),
                entries(&[
                    ("foo", "1"),
                    ("bar", "2"),
                    ("rojo", "1"),
                    ("congo", "2"),
                    ("baz", "3"),
                ]),
            ),
            // Empty headers and members are allowed.
            ("no lines", vec![], entries(&[])),
            ("empty header", lines(&[""]), entries(&[])),
            (
                "empty then value",
                lines(&["", "foo=1"]),
                entries(&[("foo", "1")]),
            ),
            (
                "value then empty",
                lines(&["foo=1", ""]),
                entries(&[("foo", "1")]),
            ),
            (
                "empty members skipped",
                lines(&[",, foo=1 , \t ,,bar=2,"]),
                entries(&[("foo", "1"), ("bar", "2")]),
            ),
            // OWS around members (test suite test_tracestate_ows_handling).
            (
                "ows mixed",
                lines(&["foo=1 \t , \t bar=2, \t baz=3"]),
                entries(&[("foo", "1"), ("bar", "2"), ("baz", "3")]),
            ),
            (
                "ows tabs",
                lines(&["foo=1\t \t,\t \tbar=2,\t \tbaz=3"]),
                entries(&[("foo", "1"), ("bar", "2"), ("baz", "3")]),
            ),
            (
                "leading space",
                lines(&[" foo=1"]),
                entries(&[("foo", "1")]),
            ),
            ("leading tab", lines(&["\tfoo=1"]), entries(&[("foo", "1")])),
            (
                "trailing space",
                lines(&["foo=1 "]),
                entries(&[("foo", "1")]),
            ),
            (
                "trailing tab",
                lines(&["foo=1\t"]),
                entries(&[("foo", "1")]),
            ),
            ("both", lines(&["\t foo=1 \t"]), entries(&[("foo", "1")])),
            // §3.3.1.3.2: leading spaces are part of the value.
            (
                "value leading space kept",
                lines(&["foo= bar"]),
                entries(&[("foo", " bar")]),
            ),
            (
                "value inner space",
                lines(&["foo=a b"]),
                entries(&[("foo", "a b")]),
            ),
            // Every allowed character (test suite test_tracestate_all_allowed_characters).
            (
                "all allowed characters",
                vec![format!("{key_chars}={value_chars}")],
                Ok(vec![(key_chars.to_owned(), value_chars.clone())]),
            ),
            (
                "all allowed characters, vendor key",
                vec![format!("{vendor_key}={value_chars}")],
                Ok(vec![(vendor_key.clone(), value_chars.clone())]),
            ),
            (
                "spec multi-tenant key",
                lines(&["fw529a3039@dt=x"]),
                entries(&[("fw529a3039@dt", "x")]),
            ),
            (
                "tenant may start with a digit",
                lines(&["1a@dt=x"]),
                entries(&[("1a@dt", "x")]),
            ),
            // §3.3.1.4: one entry per key.
            (
                "duplicate same value",
                lines(&["foo=1,foo=1"]),
                Err(E::TracestateDuplicateKey),
            ),
            (
                "duplicate other value",
                lines(&["foo=1,foo=2"]),
                Err(E::TracestateDuplicateKey),
            ),
            (
                "duplicate across lines",
                lines(&["foo=1", "foo=2"]),
                Err(E::TracestateDuplicateKey),
            ),
            // Key grammar.
            (
                "key with space",
                lines(&["foo =1"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "uppercase key",
                lines(&["FOO=1"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "key with dot",
                lines(&["foo.bar=1"]),
                Err(E::TracestateInvalidKey),
            ),
            ("empty key", lines(&["=1"]), Err(E::TracestateInvalidKey)),
            (
                "simple key starts with a digit",
                lines(&["1foo=1"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "simple key starts with _",
                lines(&["_foo=1"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "empty system id",
                lines(&["foo@=1,bar=2"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "empty tenant id",
                lines(&["@foo=1,bar=2"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "two @ together",
                lines(&["foo@@bar=1,bar=2"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "two @ apart",
                lines(&["foo@bar@baz=1,bar=2"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "system id starts with a digit",
                lines(&["foo@1a=1"]),
                Err(E::TracestateInvalidKey),
            ),
            (
                "non-ASCII key",
                lines(&["fé=1"]),
                Err(E::TracestateInvalidKey),
            ),
            // Key lengths (test suite test_tracestate_key_length_limit).
            (
                "key of 256",
                vec!["foo=1".into(), format!("{}=1", "z".repeat(256))],
                Ok(vec![
                    ("foo".into(), "1".into()),
                    ("z".repeat(256), "1".into()),
                ]),
            ),
            (
                "key of 257",
                vec!["foo=1".into(), format!("{}=1", "z".repeat(257))],
                Err(E::TracestateInvalidKey),
            ),
            (
                "tenant 241, system 14",
                vec![format!("{}@{}=1", "t".repeat(241), "v".repeat(14))],
                Ok(vec![(
                    format!("{}@{}", "t".repeat(241), "v".repeat(14)),
                    "1".into(),
                )]),
            ),
            (
                "tenant 242",
                vec!["foo=1".into(), format!("{}@v=1", "t".repeat(242))],
                Err(E::TracestateInvalidKey),
            ),
            (
                "system 15",
                vec!["foo=1".into(), format!("t@{}=1", "v".repeat(15))],
                Err(E::TracestateInvalidKey),
            ),
            // Value grammar (test suite test_tracestate_value_illegal_characters).
            (
                "value with =",
                lines(&["foo=bar=baz"]),
                Err(E::TracestateInvalidValue),
            ),
            (
                "empty value",
                lines(&["foo=,bar=3"]),
                Err(E::TracestateInvalidValue),
            ),
            (
                "value with tab inside",
                lines(&["foo=a\tb"]),
                Err(E::TracestateInvalidValue),
            ),
            (
                "value with DEL",
                lines(&["foo=a\u{7f}"]),
                Err(E::TracestateInvalidValue),
            ),
            (
                "non-ASCII value",
                lines(&["foo=é"]),
                Err(E::TracestateInvalidValue),
            ),
            (
                "value of 256",
                vec![format!("foo={}", "v".repeat(256))],
                Ok(vec![("foo".into(), "v".repeat(256))]),
            ),
            (
                "value of 257",
                vec![format!("foo={}", "v".repeat(257))],
                Err(E::TracestateInvalidValue),
            ),
            (
                "member without =",
                lines(&["foo"]),
                Err(E::TracestateMalformedMember),
            ),
            // §3.3.1.1: at most 32 members (test suite test_tracestate_member_count_limit).
            ("32 members", numbered_lines(32), Ok(thirty_two)),
            (
                "33 members",
                numbered_lines(33),
                Err(E::TracestateTooManyMembers),
            ),
            (
                "empty members do not count",
                vec![numbered_lines(32).join(",,, ,")],
                Ok((1..=32)
                    .map(|i| (format!("bar{i:02}"), format!("{i:02}")))
                    .collect()),
            ),
        ]
    }

    fn run_tracestate(lines: &[String], grammar: KeyGrammar) -> StateOutcome {
        let values: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
        parse_tracestate_with(&values, grammar).map(|state| {
            state
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect()
        })
    }

    #[test]
    fn tracestate_rules() {
        for (name, lines, expected) in tracestate_rows() {
            let values: Vec<&[u8]> = lines.iter().map(|l| l.as_bytes()).collect();
            let got = parse_tracestate(&values).map(|state| {
                state
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect::<Vec<_>>()
            });
            assert_eq!(got, expected, "{name}: {lines:?}");
        }
    }

    #[test]
    fn tracestate_level2_keys() {
        let rows: Vec<(&str, &str, StateOutcome)> = vec![
            (
                "Level 1 keys still valid",
                "fw529a3039@dt=x",
                entries(&[("fw529a3039@dt", "x")]),
            ),
            ("@ at the end", "foo@=1", entries(&[("foo@", "1")])),
            ("two @", "foo@@bar=1", entries(&[("foo@@bar", "1")])),
            ("digit first", "1foo=1", entries(&[("1foo", "1")])),
            ("@ first", "@foo=1", Err(E::TracestateInvalidKey)),
            ("uppercase", "Foo=1", Err(E::TracestateInvalidKey)),
        ];
        for (name, line, expected) in rows {
            assert_eq!(
                run_tracestate(&[line.to_owned()], KeyGrammar::Level2),
                expected,
                "{name}"
            );
        }
        let long_tenant = format!("{}@v=1", "t".repeat(242));
        assert!(run_tracestate(&[long_tenant], KeyGrammar::Level2).is_ok());
        let too_long = format!("{}=1", "z".repeat(257));
        assert_eq!(
            run_tracestate(&[too_long], KeyGrammar::Level2),
            Err(E::TracestateInvalidKey)
        );
        // Whatever Level 1 accepts, Level 2 accepts the same way.
        for (name, lines, expected) in tracestate_rows() {
            if expected.is_ok() {
                assert_eq!(
                    run_tracestate(&lines, KeyGrammar::Level2),
                    expected,
                    "{name}"
                );
            }
        }
    }

    #[test]
    fn tracestate_accessors_and_header() {
        let state = parse_tracestate(&[b"rojo=00f067aa0ba902b7 , congo=t61rcWkgMzE"])
            .expect("spec example parses");
        assert_eq!(state.len(), 2);
        assert_eq!(state.entries().len(), 2);
        assert_eq!(
            state.entries()[0],
            ("rojo".into(), "00f067aa0ba902b7".into())
        );
        assert!(!state.is_empty());
        assert_eq!(state.get("congo"), Some("t61rcWkgMzE"));
        assert_eq!(state.get("nobody"), None);
        assert_eq!(state.to_header(), "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE");
        assert_eq!(TraceState::default().to_header(), "");
    }

    #[test]
    fn tracestate_truncation() {
        let long = "l".repeat(130);
        let line = format!("a=1,b={long},c=3,d=4");
        let state = parse_tracestate(&[line.as_bytes()]).expect("valid");
        // Fits: unchanged.
        assert_eq!(state.to_header_within(512), state.to_header());
        // Long entry goes first even though it is not last.
        assert_eq!(state.to_header_within(11), "a=1,c=3,d=4");
        // Then entries from the end.
        assert_eq!(state.to_header_within(7), "a=1,c=3");
        assert_eq!(state.to_header_within(3), "a=1");
        assert_eq!(state.to_header_within(2), "");
        assert_eq!(state.to_header_within(0), "");
    }

    /// Expected B3 outcome: (trace id, span id, sampled, debug, deferred) or the error.
    type B3Outcome = Result<(&'static str, &'static str, bool, bool, bool), ContextError>;

    fn b3_summary(
        got: &Result<SpanContext, ContextError>,
    ) -> Result<(String, String, bool, bool, bool), ContextError> {
        got.as_ref()
            .map(|c| {
                let (t, s) = ids(c);
                (t, s, c.sampled, c.debug, c.sampling_deferred)
            })
            .map_err(|e| *e)
    }

    fn owned(expected: B3Outcome) -> Result<(String, String, bool, bool, bool), ContextError> {
        expected.map(|(t, s, a, d, f)| (t.to_owned(), s.to_owned(), a, d, f))
    }

    const B3_TRACE: &str = "80f198ee56343ba864fe8b2a57d3eff7";
    const B3_SPAN: &str = "05e3ac9a4f6e3b90";
    const B3_PARENT: &str = "e457b5a2e4d86bd1";
    const B3_PADDED: &str = "0000000000000000e457b5a2e4d86bd1";

    #[test]
    fn b3_single_rules() {
        let rows: Vec<(&str, String, B3Outcome)> = vec![
            // B3 README examples.
            (
                "spec example with parent",
                format!("{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}"),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "spec accept",
                format!("{B3_TRACE}-{B3_SPAN}-1"),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "spec debug",
                format!("{B3_TRACE}-{B3_SPAN}-d"),
                Ok((B3_TRACE, B3_SPAN, true, true, false)),
            ),
            (
                "deny",
                format!("{B3_TRACE}-{B3_SPAN}-0"),
                Ok((B3_TRACE, B3_SPAN, false, false, false)),
            ),
            (
                "defer",
                format!("{B3_TRACE}-{B3_SPAN}"),
                Ok((B3_TRACE, B3_SPAN, false, false, true)),
            ),
            (
                "64-bit trace id",
                format!("{B3_PARENT}-{B3_SPAN}-1"),
                Ok((B3_PADDED, B3_SPAN, true, false, false)),
            ),
            (
                "ows",
                format!(" \t{B3_TRACE}-{B3_SPAN}-1 "),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "zero parent accepted",
                format!("{B3_TRACE}-{B3_SPAN}-1-{}", "0".repeat(16)),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            // Sampling state alone.
            (
                "spec deny only",
                "0".into(),
                Err(E::SamplingOnly(SamplingDecision::Deny)),
            ),
            (
                "accept only",
                "1".into(),
                Err(E::SamplingOnly(SamplingDecision::Accept)),
            ),
            (
                "debug only",
                "d".into(),
                Err(E::SamplingOnly(SamplingDecision::Debug)),
            ),
            ("bad state only", "x".into(), Err(E::InvalidSamplingState)),
            (
                "bad state",
                format!("{B3_TRACE}-{B3_SPAN}-2"),
                Err(E::InvalidSamplingState),
            ),
            (
                "true is not a state",
                format!("{B3_TRACE}-{B3_SPAN}-true"),
                Err(E::InvalidSamplingState),
            ),
            (
                "empty state",
                format!("{B3_TRACE}-{B3_SPAN}--{B3_PARENT}"),
                Err(E::InvalidSamplingState),
            ),
            (
                "D is not d",
                format!("{B3_TRACE}-{B3_SPAN}-D"),
                Err(E::InvalidSamplingState),
            ),
            // Ids: lower-hex, lengths, not zero.
            (
                "uppercase trace id",
                format!("{}-{B3_SPAN}-1", B3_TRACE.to_uppercase()),
                Err(E::UppercaseHex),
            ),
            (
                "uppercase span id",
                format!("{B3_TRACE}-{}-1", B3_SPAN.to_uppercase()),
                Err(E::UppercaseHex),
            ),
            (
                "trace id of 20",
                format!("{}-{B3_SPAN}-1", &B3_TRACE[..20]),
                Err(E::WrongLength),
            ),
            (
                "span id of 15",
                format!("{B3_TRACE}-{}-1", &B3_SPAN[..15]),
                Err(E::WrongLength),
            ),
            (
                "non-hex trace id",
                format!("{}g-{B3_SPAN}-1", &B3_TRACE[..31]),
                Err(E::Malformed),
            ),
            (
                "zero trace id",
                format!("{}-{B3_SPAN}-1", "0".repeat(32)),
                Err(E::AllZeroTraceId),
            ),
            (
                "zero 64-bit trace id",
                format!("{}-{B3_SPAN}-1", "0".repeat(16)),
                Err(E::AllZeroTraceId),
            ),
            (
                "zero span id",
                format!("{B3_TRACE}-{}-1", "0".repeat(16)),
                Err(E::AllZeroSpanId),
            ),
            (
                "bad parent",
                format!("{B3_TRACE}-{B3_SPAN}-1-xyz"),
                Err(E::InvalidParentSpanId),
            ),
            (
                "uppercase parent",
                format!("{B3_TRACE}-{B3_SPAN}-1-{}", B3_PARENT.to_uppercase()),
                Err(E::InvalidParentSpanId),
            ),
            (
                "too many fields",
                format!("{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}-x"),
                Err(E::Malformed),
            ),
            ("trace id only", B3_TRACE.into(), Err(E::MissingSpanId)),
            ("empty", String::new(), Err(E::Empty)),
            (
                "non-ASCII",
                format!("{B3_TRACE}-{B3_SPAN}-é"),
                Err(E::NonAscii),
            ),
        ];
        for (name, input, expected) in rows {
            let got = parse_b3_single(input.as_bytes());
            assert_eq!(b3_summary(&got), owned(expected), "{name}: {input:?}");
            if let Ok(context) = got {
                assert_eq!(context.format, ContextFormat::B3Single);
                assert_eq!(context.trace_flags, u8::from(context.sampled));
            }
        }
    }

    #[test]
    fn b3_multi_rules() {
        let h = |trace: Option<&'static str>,
                 span: Option<&'static str>,
                 parent: Option<&'static str>,
                 sampled: Option<&'static str>,
                 flags: Option<&'static str>| B3MultiHeaders {
            trace_id: trace.map(str::as_bytes),
            span_id: span.map(str::as_bytes),
            parent_span_id: parent.map(str::as_bytes),
            sampled: sampled.map(str::as_bytes),
            flags: flags.map(str::as_bytes),
        };
        let (t, s, p) = (Some(B3_TRACE), Some(B3_SPAN), Some(B3_PARENT));
        let rows: Vec<(&str, B3MultiHeaders<'static>, B3Outcome)> = vec![
            (
                "accept with parent",
                h(t, s, p, Some("1"), None),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "deny",
                h(t, s, None, Some("0"), None),
                Ok((B3_TRACE, B3_SPAN, false, false, false)),
            ),
            (
                "lenient true",
                h(t, s, None, Some("true"), None),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "lenient false",
                h(t, s, None, Some("false"), None),
                Ok((B3_TRACE, B3_SPAN, false, false, false)),
            ),
            (
                "lenient True",
                h(t, s, None, Some("True"), None),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "defer",
                h(t, s, None, None, None),
                Ok((B3_TRACE, B3_SPAN, false, false, true)),
            ),
            (
                "debug flag",
                h(t, s, None, None, Some("1")),
                Ok((B3_TRACE, B3_SPAN, true, true, false)),
            ),
            (
                "debug beats deny",
                h(t, s, None, Some("0"), Some("1")),
                Ok((B3_TRACE, B3_SPAN, true, true, false)),
            ),
            (
                "other flags ignored",
                h(t, s, None, Some("1"), Some("0")),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "garbage flags ignored",
                h(t, s, None, None, Some("é")),
                Ok((B3_TRACE, B3_SPAN, false, false, true)),
            ),
            (
                "64-bit trace id",
                h(Some(B3_PARENT), s, None, Some("1"), None),
                Ok((B3_PADDED, B3_SPAN, true, false, false)),
            ),
            (
                "ows",
                h(
                    Some(" 80f198ee56343ba864fe8b2a57d3eff7\t"),
                    Some(" 05e3ac9a4f6e3b90 "),
                    None,
                    Some(" 1 "),
                    None,
                ),
                Ok((B3_TRACE, B3_SPAN, true, false, false)),
            ),
            (
                "missing span id",
                h(t, None, None, Some("1"), None),
                Err(E::MissingSpanId),
            ),
            (
                "missing trace id",
                h(None, s, None, Some("1"), None),
                Err(E::MissingTraceId),
            ),
            (
                "parent only",
                h(None, None, p, None, None),
                Err(E::MissingTraceId),
            ),
            (
                "ignored flags only",
                h(None, None, None, None, Some("0")),
                Err(E::MissingTraceId),
            ),
            (
                "sampled only",
                h(None, None, None, Some("0"), None),
                Err(E::SamplingOnly(SamplingDecision::Deny)),
            ),
            (
                "debug only",
                h(None, None, None, None, Some("1")),
                Err(E::SamplingOnly(SamplingDecision::Debug)),
            ),
            (
                "sampled yes",
                h(t, s, None, Some("yes"), None),
                Err(E::InvalidSamplingState),
            ),
            (
                "sampled d",
                h(t, s, None, Some("d"), None),
                Err(E::InvalidSamplingState),
            ),
            (
                "uppercase trace id",
                h(
                    Some("80F198EE56343BA864FE8B2A57D3EFF7"),
                    s,
                    None,
                    None,
                    None,
                ),
                Err(E::UppercaseHex),
            ),
            (
                "empty trace id",
                h(Some(""), s, None, None, None),
                Err(E::Empty),
            ),
            (
                "zero span id",
                h(t, Some("0000000000000000"), None, None, None),
                Err(E::AllZeroSpanId),
            ),
            (
                "bad parent",
                h(t, s, Some("05e3ac9a4f6e3b9"), None, None),
                Err(E::InvalidParentSpanId),
            ),
        ];
        for (name, headers, expected) in rows {
            let got = parse_b3_multi(&headers);
            assert_eq!(b3_summary(&got), owned(expected), "{name}");
            if let Ok(context) = got {
                assert_eq!(context.format, ContextFormat::B3Multi);
            }
        }
    }

    /// Headers as captured, in wire order.
    type Headers<'a> = Vec<(&'a str, &'a [u8])>;

    /// Expected `extract` outcome: (format, trace id) or the error.
    type ExtractOutcome = Result<Option<(ContextFormat, &'static str)>, ContextError>;

    #[test]
    fn extract_rules() {
        let tp = format!("00-{SUITE_TRACE}-{SUITE_SPAN}-01");
        let tp2 = format!("00-{TRACE}-{SPAN}-01");
        let bad_tp = format!("00-{}-{SUITE_SPAN}-01", "0".repeat(32));
        let b3 = format!("{B3_TRACE}-{B3_SPAN}-1");
        let rows: Vec<(&str, Headers<'_>, ExtractOutcome)> = vec![
            ("no headers", vec![], Ok(None)),
            (
                "unrelated headers",
                vec![("host", b"x"), ("trace-parent", tp.as_bytes())],
                Ok(None),
            ),
            (
                "traceparent",
                vec![("traceparent", tp.as_bytes())],
                Ok(Some((ContextFormat::W3C, SUITE_TRACE))),
            ),
            (
                "name case",
                vec![("TrAcEpArEnT", tp.as_bytes())],
                Ok(Some((ContextFormat::W3C, SUITE_TRACE))),
            ),
            (
                "two traceparents",
                vec![
                    ("traceparent", tp.as_bytes()),
                    ("traceparent", tp2.as_bytes()),
                ],
                Err(E::Duplicate),
            ),
            (
                "two identical traceparents",
                vec![
                    ("traceparent", tp.as_bytes()),
                    ("TRACEPARENT", tp.as_bytes()),
                ],
                Err(E::Duplicate),
            ),
            (
                "invalid traceparent",
                vec![("traceparent", bad_tp.as_bytes())],
                Err(E::AllZeroTraceId),
            ),
            (
                "non-UTF-8 traceparent",
                vec![("traceparent", &[0xc3, 0x28][..])],
                Err(E::NonAscii),
            ),
            (
                "W3C over B3",
                vec![("b3", b3.as_bytes()), ("traceparent", tp.as_bytes())],
                Ok(Some((ContextFormat::W3C, SUITE_TRACE))),
            ),
            (
                "invalid W3C falls back to b3",
                vec![("traceparent", bad_tp.as_bytes()), ("b3", b3.as_bytes())],
                Ok(Some((ContextFormat::B3Single, B3_TRACE))),
            ),
            (
                "duplicate W3C falls back to b3",
                vec![
                    ("traceparent", tp.as_bytes()),
                    ("traceparent", tp2.as_bytes()),
                    ("B3", b3.as_bytes()),
                ],
                Ok(Some((ContextFormat::B3Single, B3_TRACE))),
            ),
            (
                "invalid W3C falls back to X-B3",
                vec![
                    ("traceparent", bad_tp.as_bytes()),
                    ("X-B3-TraceId", B3_TRACE.as_bytes()),
                    ("X-B3-SpanId", B3_SPAN.as_bytes()),
                ],
                Ok(Some((ContextFormat::B3Multi, B3_TRACE))),
            ),
            (
                "both invalid: W3C error",
                vec![("traceparent", bad_tp.as_bytes()), ("b3", b"0")],
                Err(E::AllZeroTraceId),
            ),
            (
                "b3 over X-B3",
                vec![
                    ("x-b3-traceid", TRACE.as_bytes()),
                    ("x-b3-spanid", SPAN.as_bytes()),
                    ("b3", b3.as_bytes()),
                ],
                Ok(Some((ContextFormat::B3Single, B3_TRACE))),
            ),
            (
                "invalid b3 falls back to X-B3",
                vec![
                    ("b3", b"zz"),
                    ("x-b3-traceid", TRACE.as_bytes()),
                    ("x-b3-spanid", SPAN.as_bytes()),
                ],
                Ok(Some((ContextFormat::B3Multi, TRACE))),
            ),
            (
                "sampling-only b3",
                vec![("b3", b"0")],
                Err(E::SamplingOnly(SamplingDecision::Deny)),
            ),
            (
                "X-B3 first value wins",
                vec![
                    ("X-B3-TraceId", TRACE.as_bytes()),
                    ("x-b3-traceid", B3_TRACE.as_bytes()),
                    ("X-B3-SPANID", SPAN.as_bytes()),
                ],
                Ok(Some((ContextFormat::B3Multi, TRACE))),
            ),
            (
                "b3 first value wins",
                vec![("b3", b3.as_bytes()), ("b3", b"0")],
                Ok(Some((ContextFormat::B3Single, B3_TRACE))),
            ),
            (
                "X-B3 without span id",
                vec![("X-B3-TraceId", TRACE.as_bytes())],
                Err(E::MissingSpanId),
            ),
            ("tracestate alone", vec![("tracestate", b"foo=1")], Ok(None)),
        ];
        for (name, headers, expected) in rows {
            let got = extract(headers.iter().copied());
            let summary = got
                .as_ref()
                .map(|c| c.as_ref().map(|c| (c.format, c.trace_id.to_hex())))
                .map_err(|e| *e);
            let want = expected.map(|c| c.map(|(f, t)| (f, t.to_owned())));
            assert_eq!(summary, want, "{name}");
        }
    }

    #[test]
    fn extract_tracestate_handling() {
        let tp = format!("00-{SUITE_TRACE}-{SUITE_SPAN}-00");
        let run = |states: &[&'static str]| {
            let mut headers: Vec<(&str, &[u8])> = vec![("traceparent", tp.as_bytes())];
            headers.extend(states.iter().map(|s| ("TraceState", s.as_bytes())));
            extract_detailed(headers, KeyGrammar::Level1)
        };
        // Valid: attached, lines combined.
        let found = run(&["foo=1", "bar=2"]);
        let state = found.context.as_ref().and_then(|c| c.tracestate.as_ref());
        assert_eq!(
            state.map(TraceState::to_header).as_deref(),
            Some("foo=1,bar=2")
        );
        assert_eq!(found.tracestate_error, None);
        // Invalid: context kept without it, reason reported (W3C §3.3).
        let found = run(&["foo=1,foo=2"]);
        let context = found.context.clone().expect("traceparent is valid");
        assert_eq!(context.tracestate, None);
        assert_eq!(context.trace_id.to_hex(), SUITE_TRACE);
        assert_eq!(found.tracestate_error, Some(E::TracestateDuplicateKey));
        assert_eq!(found.into_result().map(|c| c.is_some()), Ok(true));
        // Empty: no tracestate, no error.
        let found = run(&["", " , "]);
        assert_eq!(found.context.and_then(|c| c.tracestate), None);
        assert_eq!(found.tracestate_error, None);
        // Without traceparent: discarded (W3C §4.2), counted.
        let found = extract_detailed([("tracestate", &b"foo=1"[..])], KeyGrammar::Level1);
        assert_eq!(
            found.tracestate_error,
            Some(E::TracestateWithoutTraceparent)
        );
        assert_eq!(found.into_result(), Ok(None));
        // Invalid traceparent: tracestate is not even parsed (W3C §3.3).
        let bad = format!("00-{SUITE_TRACE}-{SUITE_SPAN}-0");
        let found = extract_detailed(
            [
                ("traceparent", bad.as_bytes()),
                ("tracestate", &b"FOO=1"[..]),
            ],
            KeyGrammar::Level1,
        );
        assert_eq!(found.traceparent_error, Some(E::WrongLength));
        assert_eq!(found.tracestate_error, None);
        // Level 2 keys through extract_detailed.
        let found = extract_detailed(
            [
                ("traceparent", tp.as_bytes()),
                ("tracestate", &b"1foo=1"[..]),
            ],
            KeyGrammar::Level2,
        );
        assert_eq!(
            found.context.and_then(|c| c.tracestate).map(|s| s.len()),
            Some(1)
        );
    }

    #[test]
    fn extract_detailed_reports_superseded_errors() {
        let bad_tp = format!("00-{SUITE_TRACE}-{SUITE_SPAN}-0");
        let found = extract_detailed(
            [
                ("traceparent", bad_tp.as_bytes()),
                ("b3", &b"1"[..]),
                ("x-b3-traceid", B3_TRACE.as_bytes()),
                ("x-b3-spanid", B3_SPAN.as_bytes()),
            ],
            KeyGrammar::Level1,
        );
        assert_eq!(found.traceparent_error, Some(E::WrongLength));
        assert_eq!(
            found.b3_error,
            Some(E::SamplingOnly(SamplingDecision::Accept))
        );
        assert_eq!(
            found.context.map(|c| c.format),
            Some(ContextFormat::B3Multi)
        );
    }

    #[test]
    fn ids_hex_and_validity() {
        let trace = TraceId::from_hex(TRACE).expect("valid hex");
        assert_eq!(trace.to_hex(), TRACE);
        assert_eq!(trace.to_string(), TRACE);
        assert!(trace.is_valid());
        let span = SpanId::from_hex(SPAN).expect("valid hex");
        assert_eq!(span.to_hex(), SPAN);
        assert_eq!(format!("{span}"), SPAN);
        assert!(span.is_valid());
        assert_eq!(TraceId::from_hex(&TRACE.to_uppercase()), None);
        assert_eq!(TraceId::from_hex(&TRACE[1..]), None);
        assert_eq!(SpanId::from_hex("00f067aa0ba902bz"), None);
        assert_eq!(SpanId::from_hex(""), None);
        let zero = TraceId::from_hex(&"0".repeat(32)).expect("zero is hex");
        assert!(!zero.is_valid());
        assert!(!SpanId([0; 8]).is_valid());
    }

    #[test]
    fn format_round_trips() {
        let trace = TraceId::from_hex(TRACE).expect("valid");
        let span = SpanId::from_hex(SPAN).expect("valid");
        assert_eq!(
            format_traceparent(trace, span, true),
            format!("00-{TRACE}-{SPAN}-01")
        );
        assert_eq!(
            format_traceparent(trace, span, false),
            format!("00-{TRACE}-{SPAN}-00")
        );
        for sampled in [false, true] {
            let parsed = parse_traceparent(format_traceparent(trace, span, sampled).as_bytes())
                .expect("own output parses");
            assert_eq!(
                (parsed.trace_id, parsed.span_id, parsed.sampled),
                (trace, span, sampled)
            );
        }
        assert_eq!(
            format_b3_single(trace, span, true, false),
            format!("{TRACE}-{SPAN}-1")
        );
        assert_eq!(
            format_b3_single(trace, span, false, true),
            format!("{TRACE}-{SPAN}-d")
        );
        let short = TraceId::from_hex(B3_PADDED).expect("valid");
        assert_eq!(
            format_b3_single(short, span, false, false),
            format!("{B3_PARENT}-{SPAN}-0")
        );
    }

    #[test]
    fn error_labels_are_distinct() {
        let all = [
            E::Empty,
            E::NonAscii,
            E::WrongLength,
            E::Malformed,
            E::UppercaseHex,
            E::InvalidVersion,
            E::AllZeroTraceId,
            E::AllZeroSpanId,
            E::Duplicate,
            E::InvalidSamplingState,
            E::InvalidParentSpanId,
            E::SamplingOnly(SamplingDecision::Deny),
            E::MissingTraceId,
            E::MissingSpanId,
            E::TracestateWithoutTraceparent,
            E::TracestateTooManyMembers,
            E::TracestateMalformedMember,
            E::TracestateInvalidKey,
            E::TracestateInvalidValue,
            E::TracestateDuplicateKey,
        ];
        let labels: std::collections::HashSet<&str> = all.iter().map(ContextError::label).collect();
        assert_eq!(labels.len(), all.len());
        assert!(all.iter().all(|e| !e.to_string().is_empty()));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn nonzero<const N: usize>() -> impl Strategy<Value = [u8; N]>
        where
            [u8; N]: Arbitrary,
        {
            any::<[u8; N]>().prop_filter("all zero is invalid", |b| b.iter().any(|&x| x != 0))
        }

        /// Header names the parser looks at, in assorted cases, plus noise.
        fn header_name() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "traceparent",
                    "TRACEPARENT",
                    "tracestate",
                    "TraceState",
                    "b3",
                    "B3",
                    "x-b3-traceid",
                    "X-B3-SpanId",
                    "x-b3-parentspanid",
                    "X-B3-Sampled",
                    "x-b3-flags",
                ])
                .prop_map(str::to_owned),
                ".{0,12}",
            ]
        }

        /// Bytes that are mostly close to valid context values, to reach deep code paths.
        fn near_valid_value() -> impl Strategy<Value = Vec<u8>> {
            let seed = prop::sample::select(vec![
                format!("00-{TRACE}-{SPAN}-01"),
                format!("cc-{TRACE}-{SPAN}-01-future"),
                format!("{B3_TRACE}-{B3_SPAN}-1-{B3_PARENT}"),
                "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE".to_owned(),
                B3_TRACE.to_owned(),
                B3_SPAN.to_owned(),
                "1".to_owned(),
            ]);
            (
                seed,
                prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..4),
            )
                .prop_map(|(seed, edits)| {
                    let mut bytes = seed.into_bytes();
                    for (at, byte) in edits {
                        let i = at.index(bytes.len());
                        if let Some(b) = bytes.get_mut(i) {
                            *b = byte;
                        }
                    }
                    bytes
                })
        }

        fn any_value() -> impl Strategy<Value = Vec<u8>> {
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..80),
                near_valid_value()
            ]
        }

        proptest! {
            #[test]
            fn parsers_never_panic(value in any_value(), lines in prop::collection::vec(any_value(), 0..4)) {
                let _ = parse_traceparent(&value);
                let _ = parse_b3_single(&value);
                let refs: Vec<&[u8]> = lines.iter().map(Vec::as_slice).collect();
                let _ = parse_tracestate(&refs);
                let _ = parse_tracestate_with(&refs, KeyGrammar::Level2);
                let multi = B3MultiHeaders {
                    trace_id: lines.first().map(Vec::as_slice),
                    span_id: Some(&value),
                    parent_span_id: lines.get(1).map(Vec::as_slice),
                    sampled: lines.get(2).map(Vec::as_slice),
                    flags: lines.get(3).map(Vec::as_slice),
                };
                let _ = parse_b3_multi(&multi);
            }

            #[test]
            fn extract_never_panics(headers in prop::collection::vec((header_name(), any_value()), 0..8)) {
                let pairs: Vec<(&str, &[u8])> =
                    headers.iter().map(|(n, v)| (n.as_str(), v.as_slice())).collect();
                let found = extract_detailed(pairs.iter().copied(), KeyGrammar::Level1);
                // Whatever is accepted has usable ids.
                if let Some(context) = &found.context {
                    prop_assert!(context.trace_id.is_valid() && context.span_id.is_valid());
                }
                prop_assert_eq!(found.into_result(), extract(pairs.iter().copied()));
            }

            #[test]
            fn accepted_traceparent_has_valid_ids(value in any_value()) {
                if let Ok(context) = parse_traceparent(&value) {
                    prop_assert!(context.trace_id.is_valid() && context.span_id.is_valid());
                    prop_assert_eq!(context.sampled, context.trace_flags & FLAG_SAMPLED != 0);
                }
            }

            #[test]
            fn generated_traceparents_parse_back(
                trace in nonzero::<16>(),
                span in nonzero::<8>(),
                flags in any::<u8>(),
                version in 0u8..0xff,
                tail in "(-[ -~]{0,20})?",
                lead in "[ \t]{0,2}",
                trail in "[ \t]{0,2}",
            ) {
                let tail = if version == 0 { "" } else { tail.as_str() };
                let value = format!(
                    "{lead}{version:02x}-{}-{}-{flags:02x}{tail}{trail}",
                    encode_hex(&trace),
                    encode_hex(&span)
                );
                let context = parse_traceparent(value.as_bytes());
                prop_assert!(context.is_ok(), "{:?} rejected: {:?}", value, context);
                if let Ok(context) = context {
                    prop_assert_eq!(context.trace_id, TraceId(trace));
                    prop_assert_eq!(context.span_id, SpanId(span));
                    prop_assert_eq!(context.trace_flags, flags);
                    prop_assert_eq!(context.sampled, flags & 1 == 1);
                }
            }

            #[test]
            fn format_traceparent_round_trips(trace in nonzero::<16>(), span in nonzero::<8>(), sampled: bool) {
                let header = format_traceparent(TraceId(trace), SpanId(span), sampled);
                let context = parse_traceparent(header.as_bytes());
                prop_assert_eq!(
                    context.map(|c| (c.trace_id, c.span_id, c.sampled, c.trace_flags)),
                    Ok((TraceId(trace), SpanId(span), sampled, u8::from(sampled)))
                );
            }

            #[test]
            fn format_b3_round_trips(trace in nonzero::<16>(), span in nonzero::<8>(), sampled: bool, debug: bool, short: bool) {
                let mut trace = trace;
                if short {
                    // A 64-bit id: high half zero, low half not.
                    trace = [0; 16];
                    trace[15] = 1;
                }
                let header = format_b3_single(TraceId(trace), SpanId(span), sampled, debug);
                let context = parse_b3_single(header.as_bytes());
                prop_assert_eq!(
                    context.map(|c| (c.trace_id, c.span_id, c.sampled, c.debug)),
                    Ok((TraceId(trace), SpanId(span), sampled || debug, debug))
                );
            }

            #[test]
            fn generated_tracestates_round_trip(
                members in prop::collection::btree_map(
                    "[a-z][a-z0-9_*/-]{0,10}(@[a-z][a-z0-9_*/-]{0,5})?",
                    "[!-+\\--<>-~]([ -+\\--<>-~]{0,10}[!-+\\--<>-~])?",
                    0..=32,
                ),
            ) {
                let header = members.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" , ");
                let state = parse_tracestate(&[header.as_bytes()]);
                prop_assert!(state.is_ok(), "{:?} rejected: {:?}", header, state);
                if let Ok(state) = state {
                    let got: Vec<(&str, &str)> = state.iter().collect();
                    let want: Vec<(&str, &str)> = members.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    prop_assert_eq!(got, want);
                    let header = state.to_header();
                    let reparsed = parse_tracestate(&[header.as_bytes()]);
                    prop_assert_eq!(reparsed.as_ref(), Ok(&state));
                    prop_assert!(state.to_header_within(64).len() <= 64);
                }
            }
        }
    }
}
