#!/usr/bin/env bash
# Records real HTTP/1 and HTTP/2 traffic with the agent (`--dump=json`) and turns it, with
# the HTTP/2 recordings in agent/src/http2/testdata (grpcio, node, curl h2c upgrade), into fuzz
# seeds (fuzz/seeds/TARGET). Needs root (the agent loads its probes),
# python3, curl and nginx; wrk and an OpenTelemetry SDK are used when present
# (OTEL_PYTHON=/path/to/venv/bin/python with opentelemetry-sdk and
# opentelemetry-propagator-b3 installed).
#
#   cargo build -p tracer-agent && sudo fuzz/capture-seeds.sh
#
# Traced: the servers (python http.server as HTTP/1.0 and HTTP/1.1, a chunked-coding python
# server, nginx) and the shell that runs every client, so both sides of each connection are
# recorded. Seeds are named by content, so running it again only adds what is new.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
agent=${TRACER_AGENT_BIN:-$root/target/debug/tracer-agent}
otel_python=${OTEL_PYTHON:-}
work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

base=18480
mkdir -p "$work/www/sub"
printf 'hello from a static file\n' >"$work/www/hello.txt"
head -c 3000 /dev/urandom | base64 >"$work/www/sub/big.txt"
head -c 2000 /dev/urandom | base64 >"$work/upload.txt"
mkdir -p "$root/fuzz/target"

python3 -m http.server -b 127.0.0.1 -d "$work/www" $((base + 1)) >/dev/null 2>&1 &
pids+=($!)
python3 -m http.server -b 127.0.0.1 -d "$work/www" -p HTTP/1.1 $((base + 2)) >/dev/null 2>&1 &
pids+=($!)

# Chunked request bodies in, chunked responses with trailers out, and 100 Continue (Python
# answers `Expect: 100-continue` itself under HTTP/1.1).
cat >"$work/chunked.py" <<'EOF'
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def read_body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_POST(self):
        body = self.read_body()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Trailer", "X-Body-Length")
        self.end_headers()
        for part in (b"received ", str(len(body)).encode(), b" bytes\n"):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(part), part))
        self.wfile.write(b"0\r\nX-Body-Length: %d\r\n\r\n" % len(body))

    do_PUT = do_POST

    def do_GET(self):
        body = b"chunked server\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass

ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
EOF
python3 "$work/chunked.py" $((base + 3)) &
pids+=($!)

cat >"$work/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
error_log stderr error;
pid $work/nginx.pid;
events { worker_connections 64; }
http {
    access_log off;
    client_body_temp_path $work/nginx-body;
    proxy_temp_path $work/nginx-proxy;
    fastcgi_temp_path $work/nginx-fastcgi;
    uwsgi_temp_path $work/nginx-uwsgi;
    scgi_temp_path $work/nginx-scgi;
    gzip on;
    gzip_min_length 0;
    gzip_types text/plain;
    server {
        listen 127.0.0.1:$((base + 4));
        root $work/www;
        location /sub/ { autoindex on; }
    }
    server {
        listen 127.0.0.1:$((base + 5)) http2;
        root $work/www;
        location /sub/ { autoindex on; }
    }
}
EOF
nginx -c "$work/nginx.conf" &
pids+=($!)

# HTTP/2 without TLS (prior knowledge), from node's http2 module: a second HPACK encoder.
cat >"$work/h2.js" <<'EOF'
const http2 = require("http2");
const [mode, port] = process.argv.slice(2);
if (mode === "server") {
  http2.createServer((req, res) => {
    let body = 0;
    req.on("data", (d) => (body += d.length));
    req.on("end", () => {
      res.setHeader("content-type", "text/plain");
      res.setHeader("x-request-id", req.headers["x-request-id"] || "none");
      res.end(`${req.method} ${req.url} ${body}\n`);
    });
  }).listen(Number(port), "127.0.0.1");
} else {
  // One connection, several interleaved streams whose headers repeat with new values.
  const client = http2.connect(`http://127.0.0.1:${port}`);
  let left = 6;
  for (let i = 0; i < 6; i++) {
    const req = client.request({
      ":method": i % 3 === 2 ? "POST" : "GET",
      ":path": `/item/${i}?q=${i * 7}`,
      traceparent: `00-4bf92f3577b34da6a3ce929d0e0e47${10 + i}-00f067aa0ba902b${i}-01`,
      tracestate: "congo=t61rcWkgMzE",
      "x-request-id": `req-${i}`,
      "user-agent": "seed-client/1.0",
    });
    req.end(i % 3 === 2 ? "x".repeat(100 * i) : undefined);
    req.on("data", () => {});
    req.on("end", () => {
      if (--left === 0) client.close();
    });
  }
}
EOF
if command -v node >/dev/null; then
    node "$work/h2.js" server $((base + 6)) &
    pids+=($!)
fi

# The client shell waits for the agent before sending anything.
mkfifo "$work/go"
cat >"$work/clients.sh" <<EOF
read -r _ <"$work/go"
u1=http://127.0.0.1:$((base + 1)) u2=http://127.0.0.1:$((base + 2))
u3=http://127.0.0.1:$((base + 3)) u4=http://127.0.0.1:$((base + 4))
u5=http://127.0.0.1:$((base + 5)) u6=http://127.0.0.1:$((base + 6))
c() { curl -s "\$@" >/dev/null || true; }
c \$u1/
c -I \$u1/hello.txt
c "\$u1/nope?token=secret&a=1"
c -0 \$u1/hello.txt
c -d 'a=1&b=2' \$u1/form
c \$u2/hello.txt \$u2/sub/ \$u2/missing
c -T "$work/upload.txt" \$u2/upload
c -H 'traceparent: 00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01' \
  -H 'tracestate: congo=t61rcWkgMzE,rojo=00f067aa0ba902b7' \$u2/hello.txt
c -H 'b3: 80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90' \$u2/hello.txt
c -H 'X-B3-TraceId: 463ac35c9f6413ad48485a3953bb6124' -H 'X-B3-SpanId: a2fb4a1d1a96d312' \
  -H 'X-B3-ParentSpanId: 0020000000000001' -H 'X-B3-Sampled: 1' \$u2/hello.txt
c -d @"$work/upload.txt" \$u3/post
c -H 'Transfer-Encoding: chunked' --data-binary @"$work/upload.txt" \$u3/chunked
c -H 'Expect:' -T "$work/upload.txt" \$u3/put
c \$u3/ \$u3/again
c --compressed \$u4/hello.txt \$u4/sub/ \$u4/sub/big.txt
c -I \$u4/sub/big.txt
c -r 10-99 \$u4/sub/big.txt
c -z "\$(date -R)" \$u4/hello.txt
c -X OPTIONS \$u4/
c -X DELETE \$u4/hello.txt
python3 - <<'PY'
import socket
s = socket.create_connection(("127.0.0.1", $((base + 4))))
s.sendall(b"GET /hello.txt HTTP/1.1\r\nHost: x\r\n\r\n" * 2
          + b"HEAD /sub/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
while s.recv(65536):
    pass
PY
if [ -n "$otel_python" ]; then
    "$otel_python" - <<'PY'
import urllib.request
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

propagators = [TraceContextTextMapPropagator()]
try:
    from opentelemetry.propagators.b3 import B3MultiFormat, B3SingleFormat
    propagators += [B3SingleFormat(), B3MultiFormat()]
except ImportError:
    pass
trace.set_tracer_provider(TracerProvider())
tracer = trace.get_tracer("seeds")
for propagator in propagators:
    for _ in range(2):
        with tracer.start_as_current_span("call") as span:
            headers = {}
            propagator.inject(headers)
            if "traceparent" in headers:
                headers["tracestate"] = "vendor1=opaque,tenant@sys=v2"
            req = urllib.request.Request("http://127.0.0.1:$((base + 2))/hello.txt", headers=headers)
            urllib.request.urlopen(req).read()
PY
fi
h2=--http2-prior-knowledge
c \$h2 \$u5/hello.txt \$u5/sub/ \$u5/missing
c \$h2 -H 'traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01' \
  -H 'b3: 0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1' -d 'a=1' \$u6/post
c \$h2 \$u6/one \$u6/two -H 'x-request-id: abc' -H 'cookie: a=1; b=2'
if command -v node >/dev/null; then node "$work/h2.js" client $((base + 6)); fi
if command -v wrk >/dev/null; then wrk -t1 -c2 -d1s \$u4/hello.txt >/dev/null; fi
EOF
bash "$work/clients.sh" &
clients=$!
pids+=($clients)

sleep 1
"$agent" --dump=json --metrics-addr 127.0.0.1:$((base + 9)) \
    $(printf -- '--pid %s ' "${pids[@]}") \
    >"$work/dump.jsonl" 2>"$work/agent.log" &
agent_pid=$!
pids+=($agent_pid)
for _ in $(seq 120); do
    curl -sf http://127.0.0.1:$((base + 9))/readyz >/dev/null && break
    sleep 0.5
done
echo go >"$work/go"
wait "$clients" || true
sleep 1
kill -INT "$agent_pid"
wait "$agent_pid" || true
echo "captured $(grep -c '"event":"data"' "$work/dump.jsonl") reads and writes" >&2
# The seed tool links the agent library but not its probes: an empty object stands in for them
# (at a fixed path, which the agent's build script watches).
: >"$root/fuzz/target/no-probes.o"
TRACER_PROBES_OBJ="$root/fuzz/target/no-probes.o" cargo run -q --manifest-path "$root/fuzz/Cargo.toml" \
    --target-dir "$root/fuzz/target" --example seeds_from_dump -- "$root/fuzz/seeds" "$work/dump.jsonl" \
    "$root"/agent/src/http2/testdata/*.txt
