//! Head sampling of new traces, per the OpenTelemetry SDK environment variables
//! OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG. The default, parentbased_always_on, keeps
//! every trace and follows the sampled flag a caller propagated, so a trace is never cut in half.

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
    /// From OTEL_TRACES_SAMPLER and OTEL_TRACES_SAMPLER_ARG as returned by `lookup`.
    pub fn from_env(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SamplerError> {
        let Some(name) = lookup("OTEL_TRACES_SAMPLER").filter(|s| !s.trim().is_empty()) else {
            return Ok(Sampler::default());
        };
        let ratio = || -> Result<f64, SamplerError> {
            match lookup("OTEL_TRACES_SAMPLER_ARG") {
                // The specification's default ratio is 1.0.
                None => Ok(1.0),
                Some(arg) => arg
                    .trim()
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or(SamplerError::BadRatio(arg)),
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
            _ => return Err(SamplerError::Unknown(name)),
        })
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

#[cfg(test)]
mod tests {
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

    #[test]
    fn ratio_keeps_about_its_share() {
        let s = Sampler::TraceIdRatio(0.1);
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut kept = 0;
        let n = 100_000;
        for _ in 0..n {
            // splitmix64: a deterministic spread of trace ids.
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            let mut id = [0u8; 16];
            id[8..].copy_from_slice(&z.to_be_bytes());
            kept += usize::from(s.should_sample(&id, None));
        }
        // 0.1 of 100k: standard deviation about 95; allow 5 sigma.
        assert!((kept as i64 - 10_000).abs() < 475, "kept {kept}");
        assert!(!Sampler::TraceIdRatio(0.0).should_sample(&[0xff; 16], None));
        assert!(Sampler::TraceIdRatio(1.0).should_sample(&[0xff; 16], None));
    }
}
