#!/usr/bin/env python3
"""Records the real HTTP/2 traffic the http2 parser tests replay.

Each scenario runs a real client against a real server through a TCP relay that writes every
chunk it reads, in the order read, to `<scenario>.txt`: `C <hex>` for client-to-server bytes,
`S <hex>` for server-to-client bytes, one line per read. Requirements: python packages
`grpcio h2 hypercorn`, node (>= 18) and curl with HTTP/2 on PATH.

    python3 capture.py [scenario...]      # all scenarios by default
"""

import concurrent.futures
import os
import socket
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


class Relay:
    """Forwards one connection from a local port to `target`, recording both directions."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.port = self.listener.getsockname()[1]
        self.records = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        client, _ = self.listener.accept()
        server = socket.create_connection(("127.0.0.1", self.target_port))
        for s in (client, server):
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        threads = [
            threading.Thread(target=self._pump, args=(client, server, "C")),
            threading.Thread(target=self._pump, args=(server, client, "S")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        client.close()
        server.close()
        self.done.set()

    def _pump(self, src, dst, tag):
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = b""
            if not data:
                try:
                    dst.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
                return
            # Recorded before it is forwarded, so an answer is always recorded after its cause.
            with self.lock:
                self.records.append((tag, data))
            try:
                dst.sendall(data)
            except OSError:
                return

    def save(self, name, note):
        self.done.wait(20)
        path = os.path.join(HERE, name + ".txt")
        with open(path, "w") as f:
            f.write(f"# {note}\n# Recorded by capture.py: C client to server, S server to client, one read per line.\n")
            for tag, data in self.records:
                f.write(f"{tag} {data.hex()}\n")
        print(f"{path}: {len(self.records)} reads, {sum(len(d) for _, d in self.records)} bytes")


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port):
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port)).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


# gRPC scenarios: a real grpcio server and client, messages as raw bytes (no protobuf needed).


def grpc_server():
    import grpc

    def say_hello(request, context):
        return b"hello " + request

    def get_item(request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such item")

    def count(request, context):
        for i in range(3):
            time.sleep(0.02)
            yield b"tick %d of %s" % (i, request)

    handlers = {
        "SayHello": grpc.unary_unary_rpc_method_handler(say_hello),
        "GetItem": grpc.unary_unary_rpc_method_handler(get_item),
        "Count": grpc.unary_stream_rpc_method_handler(count),
    }
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Greeter", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


def grpc_scenario(name, note, run):
    import grpc

    server, port = grpc_server()
    relay = Relay(port)
    channel = grpc.insecure_channel(f"127.0.0.1:{relay.port}")
    run(channel)
    channel.close()
    server.stop(0)
    relay.save(name, note)


def grpc_unary_ok(channel):
    call = channel.unary_unary("/demo.Greeter/SayHello")
    assert call(b"world", metadata=[("traceparent", TRACEPARENT)], timeout=5) == b"hello world"


def grpc_not_found(channel):
    import grpc

    call = channel.unary_unary("/demo.Greeter/GetItem")
    try:
        call(b"item-7", timeout=5)
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("GetItem succeeded")


def grpc_server_streaming(channel):
    call = channel.unary_stream("/demo.Greeter/Count")
    assert len(list(call(b"x", metadata=[("traceparent", TRACEPARENT)], timeout=5))) == 3


def grpc_concurrent(channel):
    call = channel.unary_stream("/demo.Greeter/Count")
    # Warm up the connection so the three calls overlap on it.
    channel.unary_unary("/demo.Greeter/SayHello")(b"warm", timeout=5)
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda i: list(call(b"c%d" % i, timeout=5)), range(3)))
    assert all(len(r) == 3 for r in results)


def grpc_many_calls(channel):
    call = channel.unary_unary("/demo.Greeter/SayHello")
    for i in range(60):
        tp = "00-%032x-%016x-01" % (0x4BF92F3577B34DA6A3CE929D0E0E0000 + i, 0xF067AA0BA9020000 + i)
        assert call(b"n%d" % i, metadata=[("traceparent", tp)], timeout=5) == b"hello n%d" % i


# curl against real h2c servers.


def curl_prior_knowledge():
    port = free_port()
    server = subprocess.Popen(["node", os.path.join(HERE, "node_server.js"), str(port)])
    try:
        wait_port(port)
        relay = Relay(port)
        out = subprocess.run(
            ["curl", "-s", "--http2-prior-knowledge", f"http://127.0.0.1:{relay.port}/hello?x=1"],
            check=True, capture_output=True,
        )
        assert out.stdout == b"hello\n", out.stdout
        relay.save("curl_prior_knowledge", "curl --http2-prior-knowledge GET against node's http2 server")
    finally:
        server.kill()


def curl_upgrade():
    port = free_port()
    app = os.path.join(HERE, "asgi_app.py")
    server = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "asgi_app:app"],
        cwd=os.path.dirname(app),
    )
    try:
        wait_port(port)
        relay = Relay(port)
        out = subprocess.run(
            ["curl", "-s", "--http2", f"http://127.0.0.1:{relay.port}/upgrade-me"],
            check=True, capture_output=True,
        )
        assert out.stdout == b"upgraded\n", out.stdout
        relay.save("curl_upgrade_h2c", "curl --http2 (Upgrade: h2c) GET against hypercorn")
    finally:
        server.kill()


def h2_many_requests():
    """python-h2's client (its HPACK encoder indexes every field, so each request inserts a
    new traceparent entry) sends 60 GETs on one connection to node's server."""
    import h2.config
    import h2.connection
    import h2.events

    port = free_port()
    server = subprocess.Popen(["node", os.path.join(HERE, "node_server.js"), str(port)])
    try:
        wait_port(port)
        relay = Relay(port)
        sock = socket.create_connection(("127.0.0.1", relay.port))
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        conn.initiate_connection()
        sock.sendall(conn.data_to_send())
        for i in range(60):
            stream = conn.get_next_available_stream_id()
            tp = "00-%032x-%016x-01" % (0x0AF7651916CD43DD8448EB211C800000 + i, 0xB7AD6B7169200000 + i)
            conn.send_headers(stream, [
                (":method", "GET"), (":path", "/hello?i=%d" % i), (":scheme", "http"),
                (":authority", "127.0.0.1:%d" % relay.port), ("traceparent", tp),
            ], end_stream=True)
            sock.sendall(conn.data_to_send())
            done = False
            while not done:
                data = sock.recv(65536)
                assert data, "server closed"
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.DataReceived):
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    if isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                        done = True
                sock.sendall(conn.data_to_send())
        conn.close_connection()
        sock.sendall(conn.data_to_send())
        sock.close()
        relay.save("h2_many_requests", "python-h2 client, 60 GETs with their own traceparent, against node's server")
    finally:
        server.kill()


def node_features():
    port = free_port()
    server = subprocess.Popen(["node", os.path.join(HERE, "node_features.js"), "server", str(port)])
    try:
        wait_port(port)
        relay = Relay(port)
        subprocess.run(["node", os.path.join(HERE, "node_features.js"), "client", str(relay.port)], check=True)
        relay.save(
            "node_features",
            "node http2 client and server: padding, priority, CONTINUATION, push, 103, trailers, "
            "RST_STREAM both ways, header table size 256, GOAWAY",
        )
    finally:
        server.kill()


SCENARIOS = {
    "grpc_unary_ok": lambda: grpc_scenario(
        "grpc_unary_ok", "grpcio unary call, OK, traceparent in metadata", grpc_unary_ok),
    "grpc_not_found": lambda: grpc_scenario(
        "grpc_not_found", "grpcio unary call answered NOT_FOUND (Trailers-Only)", grpc_not_found),
    "grpc_server_streaming": lambda: grpc_scenario(
        "grpc_server_streaming", "grpcio server-streaming call, three messages", grpc_server_streaming),
    "grpc_concurrent": lambda: grpc_scenario(
        "grpc_concurrent", "grpcio: three server-streaming calls at once on one connection", grpc_concurrent),
    "grpc_many_calls": lambda: grpc_scenario(
        "grpc_many_calls", "grpcio: 60 unary calls on one connection, each with its own traceparent",
        grpc_many_calls),
    "curl_prior_knowledge": curl_prior_knowledge,
    "curl_upgrade_h2c": curl_upgrade,
    "h2_many_requests": h2_many_requests,
    "node_features": node_features,
}

if __name__ == "__main__":
    for name in sys.argv[1:] or SCENARIOS:
        SCENARIOS[name]()
