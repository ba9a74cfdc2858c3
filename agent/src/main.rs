//! tracer-agent: loads the probes, then drives the pipeline from the ring buffer until told to
//! stop. See `pipeline` for the stages and `capture` for the kernel side.

use std::{
    io::{BufWriter, Write},
    process::ExitCode,
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use log::{info, warn};
use tokio::signal::unix::{SignalKind, signal};
use tracer_common::counter;

use tracer_agent::{
    capture::{self, KernelCounters, ProbeConfig, Probes},
    cli::{Cli, ExporterChoice, OTEL_FALLBACKS, ProtocolChoice},
    clock::Clock,
    config::{self, ConfigError},
    dump::Dump,
    export::{ExportConfig, Exporter, ExporterKind, OtlpProtocol},
    link::{DEFAULT_REORDER_WINDOW_NS, Linker},
    metrics::{self, KernelLoss, Metrics},
    pipeline::{Pipeline, SpanStage},
    resource::ResourceBuilder,
    sample::{self, KeepPolicy, KeepReason, Sampler},
    select::{Selection, Selector},
    spans::{RpcConventions, SpanFactory},
    streams::StreamLimits,
    tls::{Scope as TlsScope, Tls},
};

/// What `--exporter` and the environment select; None: spans are not built at all.
fn exporter_kind(cli: &Cli) -> Option<ExporterKind> {
    let otlp = || ExporterKind::Otlp {
        protocol: cli.otlp_protocol.map(|p| match p {
            ProtocolChoice::Grpc => OtlpProtocol::Grpc,
            ProtocolChoice::HttpProtobuf => OtlpProtocol::HttpProtobuf,
        }),
        endpoint: cli.otlp_endpoint.clone(),
    };
    match cli.exporter {
        Some(ExporterChoice::Otlp) => Some(otlp()),
        Some(ExporterChoice::Console) => Some(ExporterKind::Console),
        Some(ExporterChoice::Jsonl) => Some(ExporterKind::Jsonl {
            path: cli.output.clone(),
        }),
        Some(ExporterChoice::None) => None,
        None if cli.otlp_endpoint.is_some() => Some(otlp()),
        None => match ExporterKind::default_from_env() {
            // The dump owns stdout unless spans are asked for explicitly.
            ExporterKind::Console if cli.dump.is_some() => None,
            kind => Some(kind),
        },
    }
}

/// Why mimalloc: see agent/Cargo.toml.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `mi_option_purge_delay` (mimalloc.h, v2): how long freed pages wait before they
/// go back to the kernel. `allocator_option_indices_match_mimalloc` checks the index.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
/// Its default in mimalloc v2 (options.c), in milliseconds.
#[cfg(test)]
const MI_PURGE_DELAY_DEFAULT_MS: std::ffi::c_long = 10;
/// The delay once started: longer than the drain and reorder cycle, so pages freed after one
/// drain are reused by the next instead of being purged and faulted in again (with the 10 ms
/// default, tracing nginx cost 0.03 page faults per request, 3-4% of the agent's CPU in perf;
/// 0.004 with this). What stays unused still goes back within a second, and all of it every
/// 10 s (`release_free_memory`).
const MI_PURGE_DELAY_STEADY_MS: std::ffi::c_long = 1_000;

/// Startup (BTF, ELF and /proc parsing) frees tens of MiB it allocated a moment before; with
/// the delay those pages were still held when the next ones were taken, and the agent peaked
/// at 67 MiB instead of 52 (measured). Purging at once costs CPU per free, so only for then.
fn purge_freed_memory_at_once(at_once: bool) {
    let delay = if at_once { 0 } else { MI_PURGE_DELAY_STEADY_MS };
    // SAFETY: options may be set at any time from any thread.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, delay) }
}

/// Returns the pages mimalloc holds for reuse to the kernel (after load bursts too).
fn release_free_memory() {
    // SAFETY: mi_collect only walks the allocator's own state; any thread may call it.
    unsafe { libmimalloc_sys::mi_collect(true) }
}

fn main() -> ExitCode {
    if let Some(btf) = std::env::var_os(capture::btf::CHILD_ENV) {
        return capture::btf::child_main(&btf);
    }
    purge_freed_memory_at_once(true);
    let env = |name: &str| std::env::var(name).ok();
    let cli = match config::load::<Cli>(std::env::args_os().collect(), &env) {
        Ok(loaded) if loaded.value.print_config => {
            print!("{}", loaded.effective.to_toml(OTEL_FALLBACKS, &env));
            return ExitCode::SUCCESS;
        }
        Ok(loaded) => loaded.value,
        Err(ConfigError::Cli { error, note }) => {
            // clap prints help and version on stdout (exit 0), usage errors on stderr (exit 2).
            let _ = error.print();
            if let Some(note) = note {
                eprintln!("{note}");
            }
            return ExitCode::from(u8::try_from(error.exit_code()).unwrap_or(2));
        }
        Err(err) => {
            eprintln!("tracer-agent: error: {err}");
            return ExitCode::from(2);
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(&cli.log_level))
        .format_target(false)
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("tracer-agent: error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tracer-agent: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    metrics.set_ready(false, "probes not attached yet");
    // Bind first so a bad address fails before any probe is loaded.
    if let Some(addr) = cli.metrics_addr {
        let listener = metrics::bind(addr).await?;
        let metrics = metrics.clone();
        tokio::spawn(async move {
            if let Err(err) = metrics::serve_on(listener, metrics).await {
                warn!("metrics server stopped: {err}");
            }
        });
        info!("metrics on http://{addr}/metrics, readiness on http://{addr}/readyz");
    }

    // Exporter and sampler settings fail here, before any probe is loaded.
    let sampler = Sampler::resolve(cli.sampler.as_deref(), cli.sampler_arg, |key| {
        std::env::var(key).ok()
    })?;
    if cli.sampler_arg.is_some() && sampler.ratio().is_none() {
        warn!("--sampler-arg is ignored: the sampler {sampler:?} takes no ratio");
    }
    let keep = KeepPolicy {
        errors: cli.keep_errors,
        slower_than: cli.keep_slower_than,
    };
    if keep.is_active() {
        info!(
            "sampling: {sampler:?}; also exporting spans {}",
            [
                keep.errors.then(|| "with an error status".to_owned()),
                keep.slower_than.map(|d| format!("slower than {d:?}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(" or ")
        );
        sample::install_keep_policy(keep);
    }
    let exporter = match exporter_kind(&cli) {
        Some(kind) => {
            let config = ExportConfig::from_env(kind)?;
            Some(Exporter::start(config, metrics.clone())?)
        }
        None => None,
    };

    let selection = Selection::new(cli.all, &cli.pids, &cli.selection)?;
    capture::preflight()?;
    let mut probes = capture::load(&ProbeConfig {
        trace_all: cli.all,
        pids: cli.pids.clone(),
        watch: selection.watch(),
        capture_limit: cli.capture_limit,
        ring_buffer_bytes: cli.ring_buffer_bytes,
        max_connections: cli.max_connections,
        floor: cli.probe_floor,
    })?;
    let mut selector = selection.start(&mut probes);
    // TLS plaintext: uprobes on the system's libssl and the SSL copies of the processes
    // traced now, per process (with --all host-wide); `tls_scan` picks up processes traced
    // later and copies loaded later.
    let mut tls = Tls::new(if cli.all {
        TlsScope::HostWide
    } else {
        TlsScope::PerProcess
    });
    let capture_tls = !cli.probe_floor && !cli.no_tls;
    if capture_tls {
        if !cli.all {
            raise_open_files_limit();
        }
        tls.attach_system(&mut probes);
        let targets = probes.targets.clone();
        tls.scan(&mut probes, &targets, std::time::Instant::now());
    }
    metrics.probes_attached.set(probes.attached as u64);
    metrics.set_ready(true, "all probes attached");
    // The startup transient is over.
    release_free_memory();
    purge_freed_memory_at_once(false);

    let clock = Clock::new();
    let dump = cli.dump.map(|format| {
        Dump::new(
            format,
            cli.dump_preview,
            BufWriter::with_capacity(64 * 1024, std::io::stdout()),
            clock,
        )
    });
    let limits = StreamLimits {
        max_pending_per_direction: cli.max_pending_per_direction,
        max_pending_total: cli.max_pending_total,
        ..StreamLimits::default()
    };
    let (exporter, spans) = match exporter {
        Some((exporter, handle)) => (
            Some(exporter),
            Some(SpanStage {
                linker: Linker::new(sampler, DEFAULT_REORDER_WINDOW_NS),
                factory: SpanFactory::new(clock)
                    .with_rpc_conventions(RpcConventions::from_env(|key| std::env::var(key).ok())),
                resources: ResourceBuilder::from_env()
                    .with_kubelet_logs(&cli.selection.k8s_log_dir),
                export: handle,
            }),
        ),
        None => (None, None),
    };
    let mut pipeline = Pipeline::new(limits, dump, spans);
    pipeline.snapshot_sockets(&probes.targets);

    let mut sigterm = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let deadline = async {
        match cli.duration {
            Some(secs) => tokio::time::sleep(Duration::from_secs(secs)).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    // The probes wake us only when the ring buffer fills up a quarter; otherwise a timer
    // drains it, so a busy traced process does not cost the agent a wakeup per syscall. The
    // timer slows down while drains find little (see `next_drain_period`).
    let mut drain_period = DRAIN_EVERY;
    let drain_timer = tokio::time::sleep(drain_period);
    tokio::pin!(drain_timer);
    let mut next_housekeeping = tokio::time::Instant::now() + HOUSEKEEPING_EVERY;
    let mut housekeeping: u64 = 0;
    let status_every = Duration::from_secs(cli.status_interval);
    let mut last_status = tokio::time::Instant::now();

    loop {
        tokio::select! {
            guard = probes.events.readable_mut() => {
                let mut guard = guard.context("polling the ring buffer")?;
                drain(guard.get_inner_mut(), &mut pipeline, &mut selector);
                guard.clear_ready();
                // A quarter of the ring buffer filled up: busy.
                drain_period = DRAIN_EVERY;
            }
            _ = &mut drain_timer => {
                let records = drain(probes.events.get_mut(), &mut pipeline, &mut selector);
                drain_period = next_drain_period(drain_period, records);
                let now = tokio::time::Instant::now();
                drain_timer.as_mut().reset(now + drain_period);
                if now >= next_housekeeping {
                    next_housekeeping = now + HOUSEKEEPING_EVERY;
                    housekeeping += 1;
                    pipeline.tick(Clock::monotonic_now());
                    pipeline.flush();
                    probes.poll_logger();
                    let kernel = probes.counters();
                    // The first round, then every 10 s.
                    let refresh = housekeeping % 100 == 1;
                    if refresh {
                        pipeline.sweep();
                        selector.sweep();
                        release_free_memory();
                    }
                    // Per process every round, so a newly traced process gets its uprobes
                    // soon; host-wide (--all) processes are scanned once a second.
                    if capture_tls && (!cli.all || housekeeping.is_multiple_of(10)) {
                        tls_scan(&mut tls, &mut probes, cli.all);
                    }
                    publish(&metrics, &probes, &pipeline, &kernel, cli.all, refresh);
                    publish_tls(&metrics, &tls, &kernel);
                    for (event, total) in selector.stats.totals() {
                        metrics.observe_total(&metrics.selection(event), total);
                    }
                    if !status_every.is_zero() && last_status.elapsed() >= status_every {
                        last_status = tokio::time::Instant::now();
                        print_status(&pipeline, &kernel);
                    }
                }
            }
            _ = sigterm.recv() => { info!("SIGTERM: stopping"); break; }
            _ = sigint.recv() => { info!("SIGINT: stopping"); break; }
            _ = &mut deadline => { info!("--duration reached: stopping"); break; }
        }
    }

    // Stop the probes first, so nothing is written after the last drain; then report the
    // totals once.
    probes.detach();
    drain(probes.events.get_mut(), &mut pipeline, &mut selector);
    pipeline.tick(u64::MAX);
    pipeline.flush();
    let kernel = probes.counters();
    publish(&metrics, &probes, &pipeline, &kernel, cli.all, true);
    publish_tls(&metrics, &tls, &kernel);
    print_status(&pipeline, &kernel);
    if let Some(exporter) = exporter {
        exporter.shutdown(Duration::from_secs(5)).await;
    }
    let _ = std::io::stdout().flush();
    Ok(())
}

/// The shortest drain period, while records arrive fast and the probes do not wake the agent.
const DRAIN_EVERY: Duration = Duration::from_millis(10);
/// The longest drain period.
const DRAIN_IDLE: Duration = Duration::from_millis(80);
/// A drain that found fewer records than this doubles the period, one with more halves it.
const DRAIN_BATCH: u64 = 256;

/// The next drain period after a drain that found `records`. A wakeup costs the agent about
/// 0.1 ms of CPU on a VM: an idle agent draining every 10 ms used 1% of a core, and at 2,000
/// requests/s the agent's CPU per request fell by 40% with fewer wakeups. Records then wait up
/// to 80 ms, about what the linking stage's 50 ms reorder window and the export batching add
/// anyway; a burst still wakes the agent at once when it fills a quarter of the ring buffer.
fn next_drain_period(period: Duration, records: u64) -> Duration {
    if records < DRAIN_BATCH {
        (period * 2).min(DRAIN_IDLE)
    } else {
        (period / 2).max(DRAIN_EVERY)
    }
}

/// How often the linking stage's window is advanced, counters are read and metrics published,
/// and traced processes are scanned for SSL libraries.
const HOUSEKEEPING_EVERY: Duration = Duration::from_millis(100);

/// Runs every record waiting in the ring buffer through the pipeline; returns how many there
/// were. Exec and listen records, and records of processes the selection turned down, stop at
/// the selector.
fn drain(
    ring: &mut aya::maps::RingBuf<aya::maps::MapData>,
    pipeline: &mut Pipeline<impl Write>,
    selector: &mut Selector,
) -> u64 {
    let (mut records, mut handled) = (0, false);
    while let Some(item) = ring.next() {
        records += 1;
        if selector.intercept(&item) {
            continue;
        }
        pipeline.handle(&item);
        handled = true;
    }
    if handled {
        pipeline.flush();
    }
    records
}

/// Raises the soft limit on open files to the hard one: each uprobe holds a descriptor (8
/// per libssl per traced process), and the usual soft limit of 1,024 would stop them at about
/// a hundred processes.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if !raised {
        warn!(
            "raising the open files limit failed ({}): TLS uprobes for many traced processes \
             may fail (counted in tracer_tls_total{{event=\"errors\"}})",
            std::io::Error::last_os_error()
        );
    }
}

/// Looks for SSL copies in the traced processes (see `tls` for which are scanned when).
fn tls_scan(tls: &mut Tls, probes: &mut Probes, trace_all: bool) {
    let pids: Vec<u32> = if trace_all {
        let agent = std::process::id();
        procfs::process::all_processes()
            .map(|all| {
                all.filter_map(|p| p.ok().map(|p| p.pid as u32))
                    .filter(|&pid| pid != agent)
                    .collect()
            })
            .unwrap_or_default()
    } else {
        // Not the pending ones: with exec watching every exec is pending until the selection
        // decides (within a drain), and most are refused.
        probes
            .traced
            .pids_where(|state| state == tracer_common::traced::TRACED)
    };
    tls.scan(probes, &pids, std::time::Instant::now());
}

fn publish_tls(metrics: &Metrics, tls: &Tls, kernel: &KernelCounters) {
    let stats = &tls.stats;
    for (event, total) in [
        ("files_attached", stats.files_attached),
        ("processes_attached", stats.processes_attached),
        ("processes_detached", stats.processes_detached),
        ("processes_without_ssl", stats.processes_without_ssl),
        ("libssl_without_symbols", stats.libssl_without_symbols),
        ("errors", stats.errors),
        (
            "plaintext_lost_no_socket",
            kernel.get(counter::LOSS_TLS_NO_SOCKET),
        ),
        (
            "calls_lost_map_full",
            kernel.get(counter::LOSS_TLS_CALL_MAP_FULL),
        ),
        (
            "ciphertext_bytes",
            kernel.get(counter::TLS_CIPHERTEXT_BYTES),
        ),
    ] {
        metrics.observe_total(&metrics.tls(event), total);
    }
}

/// Copies kernel and userspace figures into the metrics.
fn publish(
    metrics: &Metrics,
    probes: &Probes,
    pipeline: &Pipeline<impl Write>,
    kernel: &KernelCounters,
    trace_all: bool,
    refresh_processes: bool,
) {
    metrics.observe_total(&metrics.bytes_captured, kernel.get(counter::BYTES_CAPTURED));
    metrics.observe_total(
        &metrics.bytes_not_captured,
        kernel.get(counter::BYTES_NOT_CAPTURED),
    );
    for (loss, index) in [
        (KernelLoss::RingbufFull, counter::LOSS_RINGBUF_FULL),
        (KernelLoss::CopyFailed, counter::LOSS_COPY_FAILED),
        (
            KernelLoss::UnfollowedSyscall,
            counter::LOSS_UNFOLLOWED_SYSCALL,
        ),
        (KernelLoss::ConnMapFull, counter::LOSS_CONN_MAP_FULL),
    ] {
        metrics.observe_kernel_lost_events(loss, kernel.get(index));
    }
    metrics.observe_kernel_lost_bytes(
        KernelLoss::RingbufFull,
        kernel.get(counter::LOSS_RINGBUF_FULL_BYTES),
    );
    pipeline.publish(metrics);
    for reason in KeepReason::ALL {
        metrics.observe_total(
            &metrics.spans_kept(reason.as_str()),
            sample::kept_total(reason),
        );
    }
    // With --all the kernel keeps no list: count the processes seen with connections. With
    // --pid, walking /proc for descendants costs more, so it is refreshed every 10 s.
    if trace_all {
        metrics.processes_traced.set(pipeline.processes() as u64);
    } else if refresh_processes {
        metrics.processes_traced.set(probes.traced_count() as u64);
    }
}

/// The periodic one-line summary on stderr: what is traced and every loss so far.
fn print_status(pipeline: &Pipeline<impl Write>, kernel: &KernelCounters) {
    {
        let lost = [
            ("ring buffer full", kernel.get(counter::LOSS_RINGBUF_FULL)),
            ("copy failed", kernel.get(counter::LOSS_COPY_FAILED)),
            (
                "unfollowed syscall",
                kernel.get(counter::LOSS_UNFOLLOWED_SYSCALL),
            ),
            (
                "connection map full",
                kernel.get(counter::LOSS_CONN_MAP_FULL),
            ),
            (
                "TLS plaintext without a socket",
                kernel.get(counter::LOSS_TLS_NO_SOCKET),
            ),
            (
                "TLS calls (call map full)",
                kernel.get(counter::LOSS_TLS_CALL_MAP_FULL),
            ),
            ("undecodable", pipeline.stats.decode_errors),
            ("dump lines unwritten", pipeline.stats.dump_errors),
            ("of unknown connections", pipeline.stats.no_connection),
        ];
        let losses: Vec<String> = lost
            .iter()
            .filter(|(_, n)| *n > 0)
            .map(|(what, n)| format!("{n} {what}"))
            .collect();
        eprintln!(
            "tracer-agent: {} connections, {} events, {} bytes captured ({} not captured); lost: {}",
            pipeline.connections(),
            pipeline.stats.events,
            kernel.get(counter::BYTES_CAPTURED),
            kernel.get(counter::BYTES_NOT_CAPTURED),
            if losses.is_empty() {
                "none".to_owned()
            } else {
                losses.join(", ")
            }
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drains_slow_down_while_they_find_little_and_speed_up_under_load() {
        let ms = Duration::from_millis;
        assert_eq!(next_drain_period(ms(10), 0), ms(20));
        assert_eq!(next_drain_period(ms(40), DRAIN_BATCH - 1), ms(80));
        assert_eq!(next_drain_period(ms(80), 0), ms(80));
        assert_eq!(next_drain_period(ms(80), DRAIN_BATCH), ms(40));
        assert_eq!(next_drain_period(ms(10), 10_000), ms(10));
    }

    #[test]
    fn allocator_option_indices_match_mimalloc() {
        // Another option at this index would not have the purge delay's default.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            MI_PURGE_DELAY_DEFAULT_MS
        );
        purge_freed_memory_at_once(true);
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            0
        );
        purge_freed_memory_at_once(false);
    }
}
