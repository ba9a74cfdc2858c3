//! Sampling: which spans leave for the exporter.
//!
//! * Head sampling of new traces ([`Sampler`]): `--sampler`/`--sampler-arg` (also
//!   `TRACER_AGENT_SAMPLER`, config `sampler`...), else the OpenTelemetry SDK variables
//!   OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG. The default, parentbased_always_on, keeps
//!   every trace and follows the sampled flag a caller propagated, so a trace is never cut in
//!   half.
//! * The keep policy ([`KeepPolicy`], `--keep-errors`, `--keep-slower-than`): spans the sampler
//!   dropped are still exported when they failed or were slow, so sampling never hides the
//!   requests worth looking at. It runs in the pipeline just before the export queue.

use std::{
    sync::{
        OnceLock,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use opentelemetry::trace::Status;
use opentelemetry_sdk::trace::SpanData;

/// `OTEL_TRACES_SAMPLER`: the sampler's name, when `--sampler` is not set.
pub const OTEL_TRACES_SAMPLER: &str = "OTEL_TRACES_SAMPLER";
/// `OTEL_TRACES_SAMPLER_ARG`: the ratio of the traceidratio samplers, when `--sampler-arg` is
/// not set.
pub const OTEL_TRACES_SAMPLER_ARG: &str = "OTEL_TRACES_SAMPLER_ARG";

#[derive(Clone, Debug, PartialEq)]
pub enum Sampler {
    AlwaysOn,
    AlwaysOff,
    /// Keeps this share of traces, decided from the trace id so every span of a trace (and
    /// every agent on every host) decides the same.
    TraceIdRatio(f64),
    /// Follows the remote parent's sampled flag; roots go to the inner sampler.
    ParentBased(Box<Sampler>),
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error(
        "OTEL_TRACES_SAMPLER={0:?} is not supported; use always_on, always_off, traceidratio, \
         parentbased_always_on, parentbased_always_off or parentbased_traceidratio"
    )]
    Unknown(String),
    #[error("OTEL_TRACES_SAMPLER_ARG={0:?} is not a ratio between 0 and 1")]
    BadRatio(String),
}

impl Default for Sampler {
    fn default() -> Self {
        Sampler::ParentBased(Box::new(Sampler::AlwaysOn))
    }
}

impl Sampler {
    /// Every sampler name, as OTEL_TRACES_SAMPLER spells them.
    pub const NAMES: [&str; 6] = [
        "always_on",
        "always_off",
        "traceidratio",
        "parentbased_always_on",
        "parentbased_always_off",
        "parentbased_traceidratio",
    ];

    /// From OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG as returned by `lookup`.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SamplerError> {
        Self::resolve(None, None, lookup)
    }

    /// `name` and `ratio` from the agent's own settings (flag, TRACER_AGENT_*, config file;
    /// already validated), each falling back to its OTEL_ variable read through `lookup`.
    /// The ratio is only read (and checked) for the traceidratio samplers; it defaults to 1.
    pub fn resolve(
        name: Option<&str>,
        ratio: Option<f64>,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, SamplerError> {
        let from_env;
        let name = match name {
            Some(name) => name,
            None => match lookup(OTEL_TRACES_SAMPLER).filter(|s| !s.trim().is_empty()) {
                Some(name) => {
                    from_env = name;
                    from_env.as_str()
                }
                None => return Ok(Sampler::default()),
            },
        };
        let ratio = || -> Result<f64, SamplerError> {
            if let Some(ratio) = ratio {
                return Ok(ratio);
            }
            match lookup(OTEL_TRACES_SAMPLER_ARG) {
                // The specification's default ratio is 1.0.
                None => Ok(1.0),
                Some(arg) => parse_ratio(&arg).map_err(|_| SamplerError::BadRatio(arg)),
            }
        };
        Ok(match name.trim().to_ascii_lowercase().as_str() {
            "always_on" => Sampler::AlwaysOn,
            "always_off" => Sampler::AlwaysOff,
            "traceidratio" => Sampler::TraceIdRatio(ratio()?),
            "parentbased_always_on" => Sampler::ParentBased(Box::new(Sampler::AlwaysOn)),
            "parentbased_always_off" => Sampler::ParentBased(Box::new(Sampler::AlwaysOff)),
            "parentbased_traceidratio" => {
                Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(ratio()?)))
            }
            _ => return Err(SamplerError::Unknown(name.to_owned())),
        })
    }

    /// The ratio of a traceidratio sampler (parent-based or not); None for the others, which
    /// ignore `--sampler-arg`.
    pub fn ratio(&self) -> Option<f64> {
        match self {
            Sampler::TraceIdRatio(ratio) => Some(*ratio),
            Sampler::ParentBased(root) => root.ratio(),
            Sampler::AlwaysOn | Sampler::AlwaysOff => None,
        }
    }

    /// Whether to keep a span of `trace_id`; `parent_sampled` is the remote parent's sampled
    /// flag when the request carried trace context.
    pub fn should_sample(&self, trace_id: &[u8; 16], parent_sampled: Option<bool>) -> bool {
        match self {
            Sampler::AlwaysOn => true,
            Sampler::AlwaysOff => false,
            Sampler::TraceIdRatio(ratio) => {
                // As the OpenTelemetry SDKs do: the low 63 bits of the trace id against the
                // ratio scaled to 2^63.
                let bound = (ratio.clamp(0.0, 1.0) * (1u64 << 63) as f64) as u64;
                let mut low = [0u8; 8];
                low.copy_from_slice(&trace_id[8..]);
                (u64::from_be_bytes(low) >> 1) < bound
            }
            Sampler::ParentBased(root) => match parent_sampled {
                Some(sampled) => sampled,
                None => root.should_sample(trace_id, None),
            },
        }
    }
}

/// A sampling ratio: a number from 0 to 1 (the value parser of `--sampler-arg`).
pub fn parse_ratio(text: &str) -> Result<f64, String> {
    text.trim()
        .parse::<f64>()
        .ok()
        .filter(|ratio| (0.0..=1.0).contains(ratio))
        .ok_or_else(|| format!("{text:?} is not a ratio between 0 and 1 (e.g. 0.1 for 10%)"))
}

/// Spans to export although the sampler dropped their trace. They keep their unsampled trace
/// flags, so a backend can tell them from sampled ones; their parent may be missing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    /// Keep spans whose status is Error (5xx, a 4xx seen by the client, no response).
    pub errors: bool,
    /// Keep spans that took longer than this.
    pub slower_than: Option<Duration>,
}

/// Why [`KeepPolicy`] kept a span; the `reason` label of `tracer_spans_kept_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeepReason {
    Error,
    Slow,
}

impl KeepReason {
    pub const ALL: [Self; 2] = [Self::Error, Self::Slow];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Error => "error",
            Self::Slow => "slow",
        }
    }
}

impl KeepPolicy {
    /// Whether the policy keeps anything at all.
    pub fn is_active(&self) -> bool {
        self.errors || self.slower_than.is_some()
    }

    /// Why `span` is kept despite the sampler, if it is; an error that was also slow counts as
    /// an error.
    pub fn reason(&self, span: &SpanData) -> Option<KeepReason> {
        if self.errors && matches!(span.status, Status::Error { .. }) {
            return Some(KeepReason::Error);
        }
        let threshold = self.slower_than?;
        // A clock step can make the end precede the start: such a span is not slow.
        let took = span.end_time.duration_since(span.start_time).ok()?;
        (took > threshold).then_some(KeepReason::Slow)
    }
}

/// The policy of this process, set once at startup by [`install_keep_policy`]. A process-wide
/// setting rather than a field of the pipeline's span stage so the pipeline needs one call
/// (see `pipeline::drain_exchanges`); counted here for the same reason.
static KEEP_POLICY: OnceLock<KeepPolicy> = OnceLock::new();
static KEPT: [AtomicU64; KeepReason::ALL.len()] = [AtomicU64::new(0), AtomicU64::new(0)];

/// Sets the process's keep policy; false (and no change) if one was set already.
pub fn install_keep_policy(policy: KeepPolicy) -> bool {
    KEEP_POLICY.set(policy).is_ok()
}

/// Whether a keep policy is installed: only then are spans of sampled-out traces worth
/// building.
pub fn keep_policy_active() -> bool {
    KEEP_POLICY.get().is_some_and(KeepPolicy::is_active)
}

/// Whether the installed policy keeps `span`, which the sampler dropped; counts it by reason
/// when it does. Without an installed policy nothing is kept.
pub fn keep_anyway(span: &SpanData) -> bool {
    let Some(reason) = KEEP_POLICY.get().and_then(|policy| policy.reason(span)) else {
        return false;
    };
    KEPT[reason as usize].fetch_add(1, Ordering::Relaxed);
    true
}

/// Spans [`keep_anyway`] kept for `reason` so far (for `tracer_spans_kept_total`).
pub fn kept_total(reason: KeepReason) -> u64 {
    KEPT[reason as usize].load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use opentelemetry::{
        InstrumentationScope,
        trace::{SpanContext, SpanId, SpanKind, TraceFlags, TraceId, TraceState},
    };
    use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanEvents, SpanLinks};

    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |key| {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| (*v).to_owned())
        }
    }

    #[test]
    fn parses_env() {
        assert_eq!(Sampler::from_env(env(&[])), Ok(Sampler::default()));
        assert_eq!(
            Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "traceidratio")])),
            Ok(Sampler::TraceIdRatio(1.0))
        );
        assert_eq!(
            Sampler::from_env(env(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ])),
            Ok(Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(0.25))))
        );
        assert!(matches!(
            Sampler::from_env(env(&[
                ("OTEL_TRACES_SAMPLER", "traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "2")
            ])),
            Err(SamplerError::BadRatio(_))
        ));
        assert!(matches!(
            Sampler::from_env(env(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")])),
            Err(SamplerError::Unknown(_))
        ));
    }

    #[test]
    fn own_settings_win_over_otel_variables() {
        let otel = [
            ("OTEL_TRACES_SAMPLER", "always_off"),
            ("OTEL_TRACES_SAMPLER_ARG", "0.5"),
        ];
        assert_eq!(
            Sampler::resolve(Some("traceidratio"), Some(0.1), env(&otel)),
            Ok(Sampler::TraceIdRatio(0.1))
        );
        // Each falls back on its own: the name from the flag, the ratio from the variable.
        assert_eq!(
            Sampler::resolve(Some("traceidratio"), None, env(&otel)),
            Ok(Sampler::TraceIdRatio(0.5))
        );
        assert_eq!(
            Sampler::resolve(None, Some(0.1), env(&otel)),
            Ok(Sampler::AlwaysOff)
        );
        // A bad OTEL ratio matters only to a sampler that reads it.
        let bad = [("OTEL_TRACES_SAMPLER_ARG", "lots")];
        assert_eq!(
            Sampler::resolve(Some("always_on"), None, env(&bad)),
            Ok(Sampler::AlwaysOn)
        );
        assert_eq!(
            Sampler::resolve(Some("traceidratio"), Some(0.2), env(&bad)),
            Ok(Sampler::TraceIdRatio(0.2))
        );
        assert_eq!(
            Sampler::resolve(Some("traceidratio"), None, env(&bad)),
            Err(SamplerError::BadRatio("lots".into()))
        );
        for name in Sampler::NAMES {
            assert!(
                Sampler::resolve(Some(name), None, env(&[])).is_ok(),
                "{name}"
            );
        }
        assert_eq!(Sampler::default().ratio(), None);
        assert_eq!(
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatio(0.3))).ratio(),
            Some(0.3)
        );
    }

    #[test]
    fn ratios_parse_between_zero_and_one() {
        assert_eq!(parse_ratio("0.1"), Ok(0.1));
        assert_eq!(parse_ratio(" 1 "), Ok(1.0));
        assert_eq!(parse_ratio("0"), Ok(0.0));
        for bad in ["1.5", "-0.1", "NaN", "10%", ""] {
            assert!(parse_ratio(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parent_based_follows_parent() {
        let s = Sampler::default();
        let id = [7u8; 16];
        assert!(s.should_sample(&id, None));
        assert!(s.should_sample(&id, Some(true)));
        assert!(!s.should_sample(&id, Some(false)));
        let off = Sampler::ParentBased(Box::new(Sampler::AlwaysOff));
        assert!(!off.should_sample(&id, None));
        assert!(off.should_sample(&id, Some(true)));
    }

    /// splitmix64: a deterministic spread of trace ids.
    fn spread_ids(n: usize) -> impl Iterator<Item = [u8; 16]> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..n).map(move |_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&z.to_be_bytes());
            id
        })
    }

    /// Asserts `kept` of `n` is within 5 standard deviations of a binomial(n, p) mean.
    fn assert_binomial(kept: usize, n: usize, p: f64, what: &str) {
        let mean = n as f64 * p;
        let sigma = (n as f64 * p * (1.0 - p)).sqrt();
        assert!(
            (kept as f64 - mean).abs() < 5.0 * sigma,
            "{what}: kept {kept} of {n}, expected {mean} +- {:.0} (5 sigma)",
            5.0 * sigma
        );
    }

    #[test]
    fn ratio_keeps_about_its_share() {
        let s = Sampler::TraceIdRatio(0.1);
        let n = 100_000;
        let kept = spread_ids(n).filter(|id| s.should_sample(id, None)).count();
        // 0.1 of 100k: standard deviation about 95.
        assert_binomial(kept, n, 0.1, "splitmix ids");
        assert!(!Sampler::TraceIdRatio(0.0).should_sample(&[0xff; 16], None));
        assert!(Sampler::TraceIdRatio(1.0).should_sample(&[0xff; 16], None));
    }

    #[test]
    fn ratio_over_the_agents_own_trace_ids() {
        // The ids the span factory really draws (random, so this run differs from the last;
        // a 5-sigma bound fails by chance about once in 1.7 million runs).
        let ids = RandomIdGenerator::default();
        let sampler = Sampler::resolve(Some("traceidratio"), Some(0.1), env(&[])).unwrap();
        let n = 100_000;
        let trace_ids: Vec<[u8; 16]> = (0..n).map(|_| ids.new_trace_id().to_bytes()).collect();
        let kept: Vec<bool> = trace_ids
            .iter()
            .map(|id| sampler.should_sample(id, None))
            .collect();
        assert_binomial(kept.iter().filter(|k| **k).count(), n, 0.1, "random ids");
        // The decision is the trace id's: asking again (another span of the trace, another
        // agent) gives the same answer.
        for (id, first) in trace_ids.iter().zip(&kept).take(1000) {
            assert_eq!(sampler.should_sample(id, None), *first);
        }
    }

    #[test]
    fn parent_based_ratio_honours_parent_decisions() {
        let sampler =
            Sampler::resolve(Some("parentbased_traceidratio"), Some(0.1), env(&[])).unwrap();
        let n = 100_000;
        let count = |parent: Option<bool>| {
            spread_ids(n)
                .filter(|id| sampler.should_sample(id, parent))
                .count()
        };
        assert_eq!(count(Some(true)), n, "a sampled parent is always followed");
        assert_eq!(
            count(Some(false)),
            0,
            "an unsampled parent is always followed"
        );
        assert_binomial(count(None), n, 0.1, "roots");
        // Without parent-based, the ratio overrides a propagated decision.
        let plain = Sampler::TraceIdRatio(0.1);
        let against_parent = spread_ids(n)
            .filter(|id| plain.should_sample(id, Some(true)))
            .count();
        assert_binomial(against_parent, n, 0.1, "traceidratio with sampled parents");
    }

    fn span(status: Status, took: Duration) -> SpanData {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        SpanData {
            span_context: SpanContext::new(
                TraceId::from_bytes([1; 16]),
                SpanId::from_bytes([2; 8]),
                TraceFlags::default(),
                false,
                TraceState::default(),
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: "GET".into(),
            start_time: start,
            end_time: start + took,
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    #[test]
    fn keep_policy_keeps_errors_and_slow_spans() {
        let ms = Duration::from_millis;
        let error = span(Status::error(""), ms(1));
        let slow = span(Status::Unset, ms(300));
        let slow_error = span(Status::error("boom"), ms(300));
        let fine = span(Status::Ok, ms(1));
        let edge = span(Status::Unset, ms(250));

        let off = KeepPolicy::default();
        assert!(!off.is_active());
        for s in [&error, &slow, &fine] {
            assert_eq!(off.reason(s), None);
        }

        let errors = KeepPolicy {
            errors: true,
            slower_than: None,
        };
        assert_eq!(errors.reason(&error), Some(KeepReason::Error));
        assert_eq!(errors.reason(&slow), None);
        assert_eq!(errors.reason(&fine), None);

        let slow_only = KeepPolicy {
            errors: false,
            slower_than: Some(ms(250)),
        };
        assert_eq!(slow_only.reason(&slow), Some(KeepReason::Slow));
        assert_eq!(slow_only.reason(&error), None);
        assert_eq!(slow_only.reason(&edge), None, "slower than, not as slow as");

        let both = KeepPolicy {
            errors: true,
            slower_than: Some(ms(250)),
        };
        assert!(both.is_active());
        assert_eq!(both.reason(&slow_error), Some(KeepReason::Error));
        assert_eq!(both.reason(&slow), Some(KeepReason::Slow));
        assert_eq!(both.reason(&fine), None);

        // An end before the start (wall clock stepped back) is not slow.
        let mut backwards = span(Status::Unset, ms(0));
        backwards.end_time = backwards.start_time - ms(500);
        assert_eq!(both.reason(&backwards), None);
    }
}
