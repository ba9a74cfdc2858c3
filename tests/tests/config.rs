//! Configuration end to end, with the real agent binary: a config file, TRACER_AGENT_*
//! variables and flags together (what `--print-config` reports, and what a run does with
//! them), bad files refused with the key named, and the keep policy exporting the error and
//! slow spans of traces the sampler dropped.

use std::{
    fs,
    process::{Command, Output},
    time::{Duration, Instant},
};

use tracer_e2e::{
    Agent, Peer, TempDir,
    otlp_receiver::{KIND_SERVER, Protocol, ReceivedSpan, Receiver, STATUS_ERROR, summaries},
    wait_for_listen,
};

/// `tracer-agent args...` to completion, with `env` and none of the caller's OTEL_* or
/// TRACER_AGENT_* variables.
fn run_agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(tracer_e2e::agent_bin());
    cmd.args(args);
    for (key, _) in std::env::vars_os() {
        let key_text = key.to_string_lossy();
        if key_text.starts_with("OTEL_") || key_text.starts_with("TRACER_AGENT_") {
            cmd.env_remove(&key);
        }
    }
    cmd.envs(env.iter().copied());
    let started = Instant::now();
    let output = cmd
        .output()
        .unwrap_or_else(|err| panic!("cannot run the agent: {err}"));
    // None of these runs loads probes: they end as soon as the configuration is read.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the agent took {:?} for {args:?}",
        started.elapsed()
    );
    output
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn write(dir: &TempDir, name: &str, content: &str) -> String {
    let path = dir.path().join(name);
    fs::write(&path, content).expect("write config file");
    path.to_str().expect("utf-8 temp path").to_owned()
}

/// The line of `--print-config` output that sets `key` (`key = ...`), trimmed; panics with
/// the whole output when there is none.
fn line_of<'a>(output: &'a str, key: &str) -> &'a str {
    output
        .lines()
        .find(|line| line.starts_with(&format!("{key} = ")))
        .unwrap_or_else(|| panic!("no `{key} = ` line in --print-config output:\n{output}"))
        .trim()
}

/// `key = value  # origin` as (value, origin).
fn value_and_origin<'a>(output: &'a str, key: &str) -> (&'a str, &'a str) {
    let line = line_of(output, key);
    let rest = &line[key.len() + 3..];
    match rest.split_once(" # ") {
        Some((value, origin)) => (value.trim(), origin.trim()),
        None => (rest.trim(), ""),
    }
}

#[test]
fn bad_config_files_fail_naming_the_key() {
    let dir = TempDir::new("config");
    let cases = [
        (
            "capture-limit = 4096\notlp_endpoint = \"http://127.0.0.1:4318\"\n",
            ":2: unknown key `otlp_endpoint`; did you mean `otlp-endpoint`?",
        ),
        (
            "\n\nsampeler = \"always_on\"\n",
            ":3: unknown key `sampeler`; did you mean `sampler`?",
        ),
        (
            "capture-limit = \"lots\"\n",
            ":1: invalid value \"lots\" for `capture-limit`",
        ),
        (
            "keep-errors = \"yes\"\n",
            ":1: `keep-errors` must be true or false, not a string",
        ),
        ("keep-slower-than = \"250\"\n", "\"250\" has no unit"),
        (
            "sampler = \"sometimes\"\n",
            "invalid value \"sometimes\" for `sampler`: expected one of",
        ),
        (
            "capture-limit = 4096\ncapture-limit = 10\n",
            "duplicate key",
        ),
    ];
    for (i, (content, want)) in cases.iter().enumerate() {
        let path = write(&dir, &format!("bad{i}.toml"), content);
        let output = run_agent(&["--all", "--config", &path], &[]);
        let stderr = text(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{content:?}: expected exit 2, got {}; stderr:\n{stderr}",
            output.status
        );
        assert!(
            stderr.contains(&path),
            "{content:?}: path not named:\n{stderr}"
        );
        assert!(
            stderr.contains(want),
            "{content:?}: no {want:?} in:\n{stderr}"
        );
        assert!(
            text(&output.stdout).is_empty(),
            "{content:?}: wrote to stdout"
        );
    }

    // A missing file, named by the variable.
    let output = run_agent(
        &["--all"],
        &[("TRACER_AGENT_CONFIG", "/nonexistent/tracer-agent.toml")],
    );
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("cannot read config file /nonexistent/tracer-agent.toml"),
        "{stderr}"
    );

    // A bad variable names itself.
    let output = run_agent(&["--all"], &[("TRACER_AGENT_KEEP_SLOWER_THAN", "soon")]);
    let stderr = text(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("TRACER_AGENT_KEEP_SLOWER_THAN: invalid value \"soon\""),
        "{stderr}"
    );
}

#[test]
fn print_config_reports_a_mix_of_file_variables_and_flags() {
    let dir = TempDir::new("config");
    let file = write(
        &dir,
        "agent.toml",
        "# a comment\ncapture-limit = 8192\nstatus-interval = 5\nkeep-errors = true\n\
         all = true\n",
    );
    let env = [
        ("TRACER_AGENT_CONFIG", file.as_str()),
        ("TRACER_AGENT_STATUS_INTERVAL", "7"),
        ("TRACER_AGENT_SAMPLER", "traceidratio"),
        ("OTEL_TRACES_SAMPLER_ARG", "0.25"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318"),
    ];
    let output = run_agent(
        &[
            "--print-config",
            "--capture-limit",
            "1024",
            "--pid",
            "4242",
            "--keep-slower-than",
            "250ms",
        ],
        &env,
    );
    let stdout = text(&output.stdout);
    assert!(
        output.status.success(),
        "--print-config failed: {}\n{}",
        output.status,
        text(&output.stderr)
    );

    let file_line = |line: usize| format!("{file}:{line}");
    let expect = [
        ("capture-limit", "1024", "--capture-limit".to_owned()),
        ("pid", "[4242]", "--pid".to_owned()),
        (
            "keep-slower-than",
            "\"250ms\"",
            "--keep-slower-than".to_owned(),
        ),
        (
            "status-interval",
            "7",
            "TRACER_AGENT_STATUS_INTERVAL".to_owned(),
        ),
        (
            "sampler",
            "\"traceidratio\"",
            "TRACER_AGENT_SAMPLER".to_owned(),
        ),
        ("keep-errors", "true", file_line(4)),
        // The file's `all = true` yields to --pid, which conflicts with it.
        ("all", "false", "default".to_owned()),
        ("ring-buffer-bytes", "16777216", "default".to_owned()),
    ];
    let mut problems = Vec::new();
    for (key, value, origin) in &expect {
        let got = value_and_origin(&stdout, key);
        if got != (*value, origin.as_str()) {
            problems.push(format!("{key}: got {got:?}, want ({value:?}, {origin:?})"));
        }
    }
    for want in [
        format!("# Config file: {file} (from TRACER_AGENT_CONFIG)"),
        "not applied: all = true from".to_owned(),
        "dropped: conflicts with `pid`".to_owned(),
        "not applied: capture-limit = 8192 from".to_owned(),
        "# sampler-arg is not set".to_owned(),
        "OTEL_TRACES_SAMPLER_ARG=\"0.25\" applies".to_owned(),
        "OTEL_EXPORTER_OTLP_ENDPOINT=\"http://collector:4318\" applies".to_owned(),
    ] {
        if !stdout.contains(&want) {
            problems.push(format!("no {want:?}"));
        }
    }
    assert!(
        problems.is_empty(),
        "--print-config output is wrong:\n{}\n--- output ---\n{stdout}",
        problems.join("\n")
    );

    // The output is a config file: fed back alone, it gives the same configuration.
    let again = write(&dir, "printed.toml", &stdout);
    let output = run_agent(&["--print-config", "--config", &again], &[]);
    let reprinted = text(&output.stdout);
    assert!(output.status.success(), "{}", text(&output.stderr));
    for (key, value, _) in &expect {
        let got = value_and_origin(&reprinted, key);
        assert_eq!(got.0, *value, "{key} after a round trip:\n{reprinted}");
    }
    let line = stdout
        .lines()
        .position(|l| l.starts_with("capture-limit = "))
        .expect("printed above")
        + 1;
    assert_eq!(
        value_and_origin(&reprinted, "capture-limit").1,
        format!("{again}:{line}"),
        "origins now name the printed file:\n{reprinted}"
    );
}

/// An HTTP/1.1 keep-alive server: /ok 200 at once, /fail 500 at once, /slow 200 after 800 ms.
const SERVER: &str = r#"
import http.server
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *args):
        pass
    def do_GET(self):
        code = {"/ok": 200, "/fail": 500, "/slow": 200}.get(self.path, 404)
        if self.path == "/slow":
            time.sleep(0.8)
        body = b"%d\n" % code
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
say("port", server.server_address[1])
server.serve_forever()
"#;

fn path_of(span: &ReceivedSpan) -> &str {
    span.str("url.path").unwrap_or("?")
}

#[test]
fn keep_policy_exports_error_and_slow_spans_the_sampler_dropped() {
    let mut server = Peer::python("test server", SERVER, &[]);
    let port: u16 = server.expect_num("port");
    wait_for_listen(port);
    let receiver = Receiver::start(Protocol::HttpProtobuf);
    let dir = TempDir::new("config");
    // keep-errors from the file, keep-slower-than as a flag, the sampler from OTEL_*.
    let config = write(&dir, "agent.toml", "keep-errors = true\n");
    let endpoint = receiver.endpoint();
    let pid = server.pid().to_string();
    let mut agent = Agent::start_exporting(
        &[
            "--exporter",
            "otlp",
            "--otlp-protocol",
            receiver.protocol.flag(),
            "--otlp-endpoint",
            &endpoint,
            "--pid",
            &pid,
            "--config",
            &config,
            "--keep-slower-than",
            "400ms",
        ],
        &[("OTEL_TRACES_SAMPLER", "always_off")],
    );

    // curl itself is not traced; one connection, three requests.
    let base = format!("http://127.0.0.1:{port}");
    let mut curl = Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "-w", "code %{http_code}\\n"]);
    for path in ["/ok", "/fail", "/slow"] {
        curl.args(["-o", "/dev/null", &format!("{base}{path}")]);
    }
    let curl = curl.output().expect("run curl");
    assert_eq!(
        text(&curl.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix("code "))
            .collect::<Vec<_>>(),
        ["200", "500", "200"],
        "the peers themselves misbehaved: {}",
        text(&curl.stderr)
    );

    let servers = |spans: &[ReceivedSpan]| -> Vec<ReceivedSpan> {
        spans
            .iter()
            .filter(|s| s.span.kind == KIND_SERVER && s.pid() == Some(server.pid()))
            .cloned()
            .collect()
    };
    receiver.wait_spans("the /fail and /slow spans", Duration::from_secs(20), |s| {
        servers(s).len() >= 2
    });
    // /ok went through the pipeline too, and was dropped by the sampler.
    agent.wait_metric(
        r#"tracer_spans_dropped_total{reason="sampled_out"}"#,
        1.0,
        Duration::from_secs(20),
    );
    let kept_error = agent.metric(r#"tracer_spans_kept_total{reason="error"}"#);
    let kept_slow = agent.metric(r#"tracer_spans_kept_total{reason="slow"}"#);
    let sampled_out = agent.metric(r#"tracer_spans_dropped_total{reason="sampled_out"}"#);
    agent.stop_ok();

    let spans = servers(&receiver.spans());
    let mut paths: Vec<&str> = spans.iter().map(path_of).collect();
    paths.sort_unstable();
    assert_eq!(
        paths,
        ["/fail", "/slow"],
        "exported server spans:\n{}",
        summaries(&spans)
    );
    for span in &spans {
        let took = Duration::from_nanos(span.end_ns().saturating_sub(span.start_ns()));
        match path_of(span) {
            "/fail" => assert_eq!(span.status_code(), STATUS_ERROR, "{}", span.summary()),
            _ => assert!(took > Duration::from_millis(400), "/slow took {took:?}"),
        }
        // They are exported, but still say their trace was not sampled.
        assert_eq!(
            span.span.flags & 1,
            0,
            "sampled flag set: {}",
            span.summary()
        );
    }
    assert_eq!(
        (kept_error, kept_slow, sampled_out),
        (1.0, 1.0, 1.0),
        "tracer_spans_kept_total{{error,slow}} and sampled_out"
    );
}
