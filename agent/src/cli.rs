//! Command line of `tracer-agent`. Every option documents itself here; clap turns the doc
//! comments into `--help`.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum, builder::PossibleValuesParser};
use tracer_common::{DEFAULT_CAPTURE_LIMIT, MAX_CAPTURE_LIMIT};

use crate::{
    config::parse_duration,
    export::{
        OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_EXPORTER_OTLP_PROTOCOL,
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
    },
    sample::{OTEL_TRACES_SAMPLER, OTEL_TRACES_SAMPLER_ARG, Sampler, parse_ratio},
};

/// The OpenTelemetry variables an option falls back to, in order, when neither its flag, its
/// TRACER_AGENT_ variable nor the config file sets it (shown by --print-config).
pub const OTEL_FALLBACKS: &[(&str, &[&str])] = &[
    (
        "otlp-endpoint",
        &[
            OTEL_EXPORTER_OTLP_TRACES_ENDPOINT,
            OTEL_EXPORTER_OTLP_ENDPOINT,
        ],
    ),
    (
        "otlp-protocol",
        &[
            OTEL_EXPORTER_OTLP_TRACES_PROTOCOL,
            OTEL_EXPORTER_OTLP_PROTOCOL,
        ],
    ),
    ("sampler", &[OTEL_TRACES_SAMPLER]),
    ("sampler-arg", &[OTEL_TRACES_SAMPLER_ARG]),
];

/// tracer-agent: distributed traces for processes that carry no tracing code.
///
/// Kernel probes (tracepoints only, no kprobes) capture the TCP socket reads and writes of the
/// traced processes; each HTTP/1.x request they serve or make becomes an OpenTelemetry span.
/// Needs root, or CAP_BPF, CAP_PERFMON, CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH (README, "Deploying").
///
/// Examples:
///   sudo tracer-agent --pid 1234                 # its traces as trees on stdout
///   sudo tracer-agent --pid 1234 --otlp-endpoint http://127.0.0.1:4318   # spans to a collector
///   sudo tracer-agent --pid 1234 --dump          # watch what process 1234 sends and receives
///   sudo tracer-agent --all --metrics-addr 127.0.0.1:9464
///   sudo tracer-agent --config /etc/tracer-agent.toml --print-config   # what would run
#[derive(Parser, Debug, Clone)]
#[command(
    name = "tracer-agent",
    version,
    verbatim_doc_comment,
    after_help = "Every option is also an environment variable TRACER_AGENT_<OPTION> \
                  (TRACER_AGENT_OTLP_ENDPOINT=...; lists comma-separated, switches true/false) \
                  and a key of the --config file (otlp-endpoint = \"...\"). Precedence: flag, \
                  then variable, then config file, then default; OTEL_* variables apply only \
                  where none of these set the option. --print-config shows the result."
)]
pub struct Cli {
    /// Trace this process, its existing children and every process it forks from now on.
    /// Repeat for several processes.
    #[arg(long = "pid", value_name = "PID", required_unless_present_any = ["all", "exes", "ports"])]
    pub pids: Vec<u32>,

    /// Trace every process on the host except the agent itself.
    #[arg(long, conflicts_with = "pids")]
    pub all: bool,

    /// Print each connection's open, every read and write, and close. `text` is for people;
    /// `json` is one object per line with the captured bytes in hex, for scripts.
    #[arg(
        long,
        value_enum,
        value_name = "FORMAT",
        num_args = 0..=1,
        default_missing_value = "text",
        require_equals = true
    )]
    pub dump: Option<DumpFormat>,

    /// Where spans go: `otlp` (an OpenTelemetry collector or backend), `console` (each trace
    /// as an indented tree on stdout), `jsonl` (one OTLP/JSON request per line, see --output)
    /// or `none`. Default: otlp when an endpoint is set (--otlp-endpoint or
    /// OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT), else none with --dump, else console.
    #[arg(long, value_enum, value_name = "KIND")]
    pub exporter: Option<ExporterChoice>,

    /// OTLP endpoint, e.g. http://127.0.0.1:4318 (http/protobuf; /v1/traces is added) or
    /// http://127.0.0.1:4317 (grpc). Overrides OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT.
    #[arg(long, value_name = "URL")]
    pub otlp_endpoint: Option<String>,

    /// OTLP protocol. Overrides OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL; default http/protobuf.
    #[arg(long, value_enum, value_name = "PROTOCOL")]
    pub otlp_protocol: Option<ProtocolChoice>,

    /// File for `--exporter jsonl` (appended to); default stdout.
    #[arg(long, value_name = "PATH")]
    pub output: Option<PathBuf>,

    /// Bytes of each read or write shown by `--dump=text`.
    #[arg(long, value_name = "BYTES", default_value_t = 64)]
    pub dump_preview: usize,

    /// Serve Prometheus metrics on /metrics and readiness on /readyz at this address, e.g.
    /// 127.0.0.1:9464. Off by default; prefer a loopback address unless the port is protected.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Bytes captured per read or write syscall at most. Larger ones are reported with their
    /// full size and flagged as truncated.
    #[arg(
        long,
        value_name = "BYTES",
        default_value_t = DEFAULT_CAPTURE_LIMIT,
        value_parser = clap::value_parser!(u32).range(1..=MAX_CAPTURE_LIMIT as i64)
    )]
    pub capture_limit: u32,

    /// Size of the kernel-to-agent ring buffer in bytes: a power of two, at least 4096. When it
    /// is full, events are dropped and counted (tracer_kernel_lost_events_total).
    #[arg(long, value_name = "BYTES", default_value_t = 16 * 1024 * 1024, value_parser = parse_ring_size)]
    pub ring_buffer_bytes: u32,

    /// Connections the kernel side follows at once (about 100 bytes of kernel memory each).
    /// Beyond it a new connection is not captured, and its reads and writes are counted
    /// (tracer_kernel_lost_events_total{reason="conn_map_full"}, tracer_bytes_not_captured_total).
    #[arg(long, value_name = "N", default_value_t = 65_536,
          value_parser = clap::value_parser!(u32).range(1..=4_194_304))]
    pub max_connections: u32,

    /// Out-of-order bytes held per connection direction while waiting for a hole to fill.
    #[arg(long, value_name = "BYTES", default_value_t = 256 * 1024)]
    pub max_pending_per_direction: usize,

    /// Out-of-order bytes held across all connections.
    #[arg(long, value_name = "BYTES", default_value_t = 64 * 1024 * 1024)]
    pub max_pending_total: usize,

    /// Do not capture TLS plaintext. By default the agent puts uprobes on OpenSSL's
    /// SSL_read/SSL_write: on the system's libssl and the copies traced processes use. The
    /// kernel runs them in every process that maps those files (the probe keeps only traced
    /// ones), so untraced processes that use the same libssl pay a few microseconds per call.
    #[arg(long)]
    pub no_tls: bool,

    /// Seconds between status lines on stderr; 0 turns them off.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub status_interval: u64,

    /// Stop after this many seconds (default: run until SIGINT or SIGTERM).
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<u64>,

    /// Benchmarks only: attach a do-nothing program to the same tracepoints instead of the
    /// real probes, to measure the cost floor. Captures nothing.
    #[arg(long, hide = true)]
    pub probe_floor: bool,

    #[command(flatten)]
    pub selection: crate::select::SelectionArgs,

    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, value_name = "LEVEL", default_value = "info")]
    pub log_level: String,

    /// Head sampler for new traces. Default: OTEL_TRACES_SAMPLER, else parentbased_always_on
    /// (keep every trace; follow a caller's propagated sampled flag).
    #[arg(
        long,
        value_name = "NAME",
        value_parser = PossibleValuesParser::new(Sampler::NAMES),
        help_heading = "Sampling"
    )]
    pub sampler: Option<String>,

    /// Share of traces the traceidratio samplers keep, from 0 to 1. Default:
    /// OTEL_TRACES_SAMPLER_ARG, else 1.
    #[arg(long, value_name = "RATIO", value_parser = parse_ratio, help_heading = "Sampling")]
    pub sampler_arg: Option<f64>,

    /// Export spans whose status is Error (5xx; 4xx or no response for a client) even when
    /// the sampler dropped their trace. Counted in tracer_spans_kept_total{reason="error"}.
    #[arg(long, help_heading = "Sampling")]
    pub keep_errors: bool,

    /// Export spans that took longer than this (e.g. 250ms, 1.5s) even when the sampler
    /// dropped their trace. Counted in tracer_spans_kept_total{reason="slow"}.
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, help_heading = "Sampling")]
    pub keep_slower_than: Option<Duration>,

    /// TOML file of options (`capture-limit = 4096`, `pid = [1, 2]`, `keep-errors = true`);
    /// unknown keys are refused. Default: TRACER_AGENT_CONFIG, else none.
    #[arg(long, value_name = "PATH", help_heading = "Configuration")]
    pub config: Option<PathBuf>,

    /// Print the effective configuration as a config file, with where each value came from,
    /// and exit.
    #[arg(long, help_heading = "Configuration")]
    pub print_config: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExporterChoice {
    Otlp,
    Console,
    Jsonl,
    None,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProtocolChoice {
    Grpc,
    #[value(name = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DumpFormat {
    Text,
    Json,
}

fn parse_ring_size(value: &str) -> Result<u32, String> {
    let size: u32 = value
        .parse()
        .map_err(|err| format!("not a byte count: {err}"))?;
    if size < 4096 || !size.is_power_of_two() {
        return Err(format!(
            "{size} is not a power of two of at least 4096 (try {})",
            size.max(4096).next_power_of_two()
        ));
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn needs_a_target() {
        assert!(Cli::try_parse_from(["tracer-agent"]).is_err());
        assert!(Cli::try_parse_from(["tracer-agent", "--all", "--pid", "1"]).is_err());
        let cli = Cli::try_parse_from(["tracer-agent", "--pid", "1", "--pid", "2"]).unwrap();
        assert_eq!(cli.pids, vec![1, 2]);
    }

    #[test]
    fn dump_defaults_to_text() {
        let cli = Cli::try_parse_from(["tracer-agent", "--all", "--dump"]).unwrap();
        assert_eq!(cli.dump, Some(DumpFormat::Text));
        let cli = Cli::try_parse_from(["tracer-agent", "--all", "--dump=json"]).unwrap();
        assert_eq!(cli.dump, Some(DumpFormat::Json));
        let cli = Cli::try_parse_from(["tracer-agent", "--all"]).unwrap();
        assert_eq!(cli.dump, None);
    }

    #[test]
    fn exporter_options() {
        let cli = Cli::try_parse_from([
            "tracer-agent",
            "--all",
            "--exporter",
            "otlp",
            "--otlp-protocol",
            "http/protobuf",
            "--otlp-endpoint",
            "http://127.0.0.1:4318",
        ])
        .unwrap();
        assert_eq!(cli.exporter, Some(ExporterChoice::Otlp));
        assert_eq!(cli.otlp_protocol, Some(ProtocolChoice::HttpProtobuf));
        assert!(Cli::try_parse_from(["tracer-agent", "--all", "--exporter", "zipkin"]).is_err());
    }

    #[test]
    fn ring_size_must_be_power_of_two() {
        assert!(parse_ring_size("4096").is_ok());
        assert!(parse_ring_size("5000").unwrap_err().contains("8192"));
        assert!(parse_ring_size("1024").is_err());
        assert!(parse_ring_size("x").is_err());
    }

    #[test]
    fn capture_limit_is_bounded() {
        assert!(Cli::try_parse_from(["tracer-agent", "--all", "--capture-limit", "0"]).is_err());
        assert!(
            Cli::try_parse_from(["tracer-agent", "--all", "--capture-limit", "65537"]).is_err()
        );
    }
}
