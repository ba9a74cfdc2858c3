//! Trace context (`tracer_agent::tracecontext`): `extract` over an arbitrary header list, and
//! each parser (traceparent, tracestate with both key grammars, b3 single and multi, hex ids)
//! on every value.
//!
//! Input: header lines separated by `\n` (a trailing `\r` is dropped), each `name:value` split
//! at the first colon; the value is passed as is, surrounding whitespace included. The multi
//! B3 headers take the first five values as trace id, span id, parent span id, sampled and
//! flags. The first byte doubles as the length limit for `TraceState::to_header_within`.
//!
//! Besides not panicking, it checks that what a parser accepts is valid and survives a
//! round trip through the matching formatter, and that the Level 2 key grammar accepts all
//! that Level 1 does.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tracer_agent::tracecontext::{
    self, B3MultiHeaders, ContextError, ContextFormat, KeyGrammar, SpanContext, SpanId, TraceId,
    TraceState,
};

fuzz_target!(|input: &[u8]| {
    let headers: Vec<(String, &[u8])> = input
        .split(|&b| b == b'\n')
        .map(|line| {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            match line.iter().position(|&b| b == b':') {
                Some(i) => (
                    String::from_utf8_lossy(&line[..i]).into_owned(),
                    &line[i + 1..],
                ),
                None => (String::from_utf8_lossy(line).into_owned(), &[][..]),
            }
        })
        .collect();
    let pairs = || headers.iter().map(|(name, value)| (name.as_str(), *value));
    let values: Vec<&[u8]> = headers.iter().map(|(_, value)| *value).collect();
    let max_len = usize::from(input.first().copied().unwrap_or(0)) * 2;

    let level1 = tracecontext::extract_detailed(pairs(), KeyGrammar::Level1);
    assert_eq!(tracecontext::extract(pairs()), level1.clone().into_result());
    for error in [
        &level1.traceparent_error,
        &level1.tracestate_error,
        &level1.b3_error,
    ]
    .into_iter()
    .flatten()
    {
        check_error(error);
    }
    if let Some(context) = &level1.context {
        check_context(context, KeyGrammar::Level1, max_len);
    }
    let level2 = tracecontext::extract_detailed(pairs(), KeyGrammar::Level2);
    if let Some(context) = &level2.context {
        check_context(context, KeyGrammar::Level2, max_len);
    }
    if level1.tracestate_error.is_none() {
        assert_eq!(level1, level2, "Level 2 keys are a superset of Level 1");
    }

    for &value in &values {
        match tracecontext::parse_traceparent(value) {
            Ok(context) => {
                assert_eq!(context.format, ContextFormat::W3C);
                check_context(&context, KeyGrammar::Level1, max_len);
                let again = tracecontext::parse_traceparent(
                    tracecontext::format_traceparent(
                        context.trace_id,
                        context.span_id,
                        context.sampled,
                    )
                    .as_bytes(),
                )
                .expect("a formatted traceparent parses");
                assert_eq!(
                    (again.trace_id, again.span_id, again.sampled),
                    (context.trace_id, context.span_id, context.sampled)
                );
            }
            Err(error) => check_error(&error),
        }
        match tracecontext::parse_b3_single(value) {
            Ok(context) => {
                assert_eq!(context.format, ContextFormat::B3Single);
                check_context(&context, KeyGrammar::Level1, max_len);
                let again = tracecontext::parse_b3_single(
                    tracecontext::format_b3_single(
                        context.trace_id,
                        context.span_id,
                        context.sampled,
                        context.debug,
                    )
                    .as_bytes(),
                )
                .expect("a formatted b3 header parses");
                assert_eq!(
                    (again.trace_id, again.span_id, again.sampled, again.debug),
                    (
                        context.trace_id,
                        context.span_id,
                        context.sampled,
                        context.debug
                    )
                );
            }
            Err(error) => check_error(&error),
        }
        if let Ok(hex) = std::str::from_utf8(value) {
            if let Some(id) = TraceId::from_hex(hex) {
                assert_eq!(id.to_hex(), hex);
                assert_eq!(id.to_string(), hex);
            }
            if let Some(id) = SpanId::from_hex(hex) {
                assert_eq!(id.to_hex(), hex);
                assert_eq!(id.to_string(), hex);
            }
        }
    }

    match tracecontext::parse_tracestate(&values) {
        Ok(state) => {
            check_tracestate(&state, KeyGrammar::Level1, max_len);
            let level2 = tracecontext::parse_tracestate_with(&values, KeyGrammar::Level2);
            assert_eq!(level2.as_ref(), Ok(&state), "Level 2 keys are a superset");
        }
        Err(error) => check_error(&error),
    }
    match tracecontext::parse_tracestate_with(&values, KeyGrammar::Level2) {
        Ok(state) => check_tracestate(&state, KeyGrammar::Level2, max_len),
        Err(error) => check_error(&error),
    }

    let multi = B3MultiHeaders {
        trace_id: values.first().copied(),
        span_id: values.get(1).copied(),
        parent_span_id: values.get(2).copied(),
        sampled: values.get(3).copied(),
        flags: values.get(4).copied(),
    };
    match tracecontext::parse_b3_multi(&multi) {
        Ok(context) => {
            assert_eq!(context.format, ContextFormat::B3Multi);
            check_context(&context, KeyGrammar::Level1, max_len);
        }
        Err(error) => check_error(&error),
    }
});

fn check_error(error: &ContextError) {
    assert!(!error.label().is_empty());
    assert!(!error.to_string().is_empty());
}

/// What every accepted context satisfies, whatever the format.
fn check_context(context: &SpanContext, grammar: KeyGrammar, max_len: usize) {
    assert!(context.trace_id.is_valid() && context.span_id.is_valid());
    match context.format {
        ContextFormat::W3C => {
            assert_eq!(
                context.sampled,
                context.trace_flags & tracecontext::FLAG_SAMPLED != 0
            );
            assert!(!context.debug && !context.sampling_deferred);
        }
        ContextFormat::B3Single | ContextFormat::B3Multi => {
            assert_eq!(context.trace_flags, u8::from(context.sampled));
            assert!(!context.debug || context.sampled, "debug implies sampled");
            assert!(!context.sampling_deferred || !context.sampled);
            assert!(context.tracestate.is_none());
        }
    }
    if let Some(state) = &context.tracestate {
        assert!(!state.is_empty(), "an empty tracestate is None");
        check_tracestate(state, grammar, max_len);
    }
}

/// A parsed tracestate re-parses to itself from its header, and shortening it keeps whole
/// entries, in order, within the limit.
fn check_tracestate(state: &TraceState, grammar: KeyGrammar, max_len: usize) {
    assert!(state.len() <= 32);
    for (i, (key, _)) in state.iter().enumerate() {
        assert_eq!(
            state.get(key),
            Some(state.entries()[i].1.as_str()),
            "keys are unique"
        );
    }
    let header = state.to_header();
    let reparsed = tracecontext::parse_tracestate_with(&[header.as_bytes()], grammar);
    assert_eq!(reparsed.as_ref(), Ok(state));
    let short = state.to_header_within(max_len);
    assert!(short.len() <= max_len);
    if header.len() <= max_len {
        assert_eq!(short, header);
    }
    let kept = tracecontext::parse_tracestate_with(&[short.as_bytes()], grammar)
        .expect("a shortened tracestate parses");
    let mut all = state.entries().iter();
    for entry in kept.entries() {
        assert!(
            all.any(|e| e == entry),
            "shortening keeps a subsequence of the entries"
        );
    }
}
