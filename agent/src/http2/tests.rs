use super::*;
use crate::field::Field;

const E: Direction = Direction::Egress;
const I: Direction = Direction::Ingress;
const CONN: u64 = 9;
const CLIENT_TID: u32 = 100;
const SERVER_TID: u32 = 200;

/// A recorded connection: who sent each read, and its bytes (see testdata/capture.py).
struct Capture {
    reads: Vec<(bool, Bytes)>,
}

fn capture(text: &str) -> Capture {
    let reads = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (who, hex) = l.split_once(' ').unwrap();
            let bytes = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect::<Vec<u8>>();
            (who == "C", Bytes::from(bytes))
        })
        .collect();
    Capture { reads }
}

fn grpc_unary_ok() -> Capture {
    capture(include_str!("testdata/grpc_unary_ok.txt"))
}

/// The direction the client's bytes take as the traced process sees them.
fn client_dir(side: Side) -> Direction {
    match side {
        Side::Client => E,
        _ => I,
    }
}

fn enter_ns(read: usize) -> u64 {
    1_000 * (read as u64 + 1)
}

fn exit_ns(read: usize) -> u64 {
    enter_ns(read) + 100
}

/// One segment per recorded read, read `k` from `enter_ns(k)` to `exit_ns(k)`.
fn segments(c: &Capture, side: Side) -> Vec<Segment> {
    let mut pos = [0u64; 2];
    c.reads
        .iter()
        .enumerate()
        .map(|(k, (from_client, data))| {
            let direction = if *from_client {
                client_dir(side)
            } else {
                other(client_dir(side))
            };
            let p = &mut pos[index(direction)];
            let seg = Segment {
                conn_id: CONN,
                direction,
                tid: if *from_client { CLIENT_TID } else { SERVER_TID },
                pos: *p,
                data: data.clone(),
                gap_before: 0,
                enter_ns: enter_ns(k),
                exit_ns: exit_ns(k),
            };
            *p += data.len() as u64;
            seg
        })
        .collect()
}

struct Outcome {
    events: Vec<Http2Event>,
    errors: Vec<Http2Error>,
    side: Side,
}

impl Outcome {
    fn exchanges(&self) -> Vec<&Http2Exchange> {
        self.events
            .iter()
            .filter_map(|e| match e {
                Http2Event::Exchange(x) => Some(x),
                Http2Event::RequestStarted { .. } => None,
            })
            .collect()
    }
}

fn run(mut conn: Http2Connection, segs: &[Segment], limits: Http2Limits) -> Outcome {
    let (mut events, mut errors) = (Vec::new(), Vec::new());
    for seg in segs {
        conn.push(seg, &mut events, &mut errors);
        assert!(conn.buffered() <= 2 * (limits.max_header_block_bytes + 200));
        assert!(conn.open_streams() <= limits.max_streams);
        assert!(conn.table_bytes() <= 2 * limits.max_table_bytes);
    }
    conn.close(&mut events, &mut errors);
    assert_eq!(conn.open_streams(), 0);
    Outcome {
        events,
        errors,
        side: conn.side(),
    }
}

fn feed(side: Side, segs: &[Segment]) -> Outcome {
    let limits = Http2Limits::default();
    run(Http2Connection::new(CONN, side, limits), segs, limits)
}

fn fields(list: &[(&str, &str)]) -> Vec<Field> {
    list.iter()
        .map(|(n, v)| ((*n).to_owned().into(), Bytes::copy_from_slice(v.as_bytes())))
        .collect()
}

/// A complete message; `from_client` picks the thread.
fn msg(
    from_client: bool,
    headers: &[(&str, &str)],
    trailers: &[(&str, &str)],
    (start_ns, end_ns): (u64, u64),
    body_bytes: u64,
) -> H2Message {
    H2Message {
        headers: fields(headers),
        trailers: fields(trailers),
        unnamed_values: Vec::new(),
        start_ns,
        end_ns,
        tid: if from_client { CLIENT_TID } else { SERVER_TID },
        body_bytes,
        truncated: false,
    }
}

fn exchange(stream_id: u32, request: H2Message, response: Option<H2Message>) -> Http2Exchange {
    Http2Exchange {
        conn_id: CONN,
        stream_id,
        request,
        response,
        interim: Vec::new(),
        reset: None,
        incomplete_headers: false,
        pushed: false,
    }
}

/// Traced as the server: client reads are Ingress (start at `exit_ns`), server writes are
/// Egress (start at `enter_ns`).
fn client_read(start: usize, end: usize) -> (u64, u64) {
    (exit_ns(start), exit_ns(end))
}

fn server_write(start: usize, end: usize) -> (u64, u64) {
    (enter_ns(start), exit_ns(end))
}

const GRPC_UA: &str = "grpc-python/1.85.1 grpc-c/58.0.0 (linux; chttp2)";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const GRPC_OK_HEADERS: &[(&str, &str)] = &[
    (":status", "200"),
    ("content-type", "application/grpc"),
    ("grpc-accept-encoding", "identity, deflate, gzip"),
];
const GRPC_OK_TRAILERS: &[(&str, &str)] = &[("grpc-status", "0"), ("grpc-message", "")];

/// A grpcio client's request header fields, in the order it sends them.
fn grpc_request<'a>(
    path: &'a str,
    authority: &'a str,
    timeout: &'a str,
    traceparent: Option<&'a str>,
) -> Vec<(&'a str, &'a str)> {
    let mut list = vec![
        (":path", path),
        (":authority", authority),
        (":method", "POST"),
        (":scheme", "http"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-accept-encoding", "identity, deflate, gzip"),
        ("grpc-timeout", timeout),
        ("user-agent", GRPC_UA),
    ];
    list.extend(traceparent.map(|tp| ("traceparent", tp)));
    list
}

fn started(x: &Http2Exchange) -> Http2Event {
    Http2Event::RequestStarted {
        conn_id: x.conn_id,
        stream_id: x.stream_id,
        start_ns: x.request.start_ns,
        tid: x.request.tid,
        headers: x.request.headers.clone(),
        unnamed_values: x.request.unnamed_values.clone(),
        incomplete_headers: x.incomplete_headers,
    }
}

/// A capture fed as recorded, traced as the server: the events must be exactly `want`, with
/// no error. Then the same capture must give the same events cut into one-byte segments
/// (same timing), with the side to learn from the preface, and (timing aside) traced as the
/// client and with each direction's consecutive reads merged into one segment.
fn check(name: &str, c: &Capture, want: &[Http2Event]) {
    let segs = segments(c, Side::Server);
    let got = feed(Side::Server, &segs);
    assert_eq!(got.events, want, "{name}: events");
    assert_eq!(got.errors, [], "{name}: errors");
    check_segmentation(name, c, &got.events);
}

fn check_segmentation(name: &str, c: &Capture, want: &[Http2Event]) {
    let segs = segments(c, Side::Server);
    let bytewise = feed(Side::Server, &one_byte_pieces(&segs));
    assert_eq!(bytewise.events, want, "{name}: one-byte segments");
    let unknown = feed(Side::Unknown, &segs);
    assert_eq!(unknown.events, want, "{name}: side unknown");
    assert_eq!(unknown.side, Side::Server, "{name}: side learned");
    let client = feed(Side::Client, &segments(c, Side::Client));
    assert_eq!(
        strip(client.events),
        strip(want.to_vec()),
        "{name}: as client"
    );
    assert_eq!(client.errors, [], "{name}: as client");
    let merged = feed(Side::Server, &merged(&segs));
    assert_eq!(
        strip(merged.events),
        strip(want.to_vec()),
        "{name}: merged reads"
    );
    assert_eq!(merged.errors, [], "{name}: merged reads");
}

/// The same bytes, one per segment, each with its read's timing and thread.
fn one_byte_pieces(segs: &[Segment]) -> Vec<Segment> {
    let mut pieces = Vec::new();
    for seg in segs {
        if seg.data.is_empty() {
            pieces.push(seg.clone());
        }
        for k in 0..seg.data.len() {
            pieces.push(Segment {
                pos: seg.pos + k as u64,
                data: seg.data.slice(k..k + 1),
                gap_before: if k == 0 { seg.gap_before } else { 0 },
                ..seg.clone()
            });
        }
    }
    pieces
}

/// Consecutive segments of the same direction joined into one (several frames per read).
fn merged(segs: &[Segment]) -> Vec<Segment> {
    let mut out: Vec<Segment> = Vec::new();
    for seg in segs {
        match out.last_mut() {
            Some(last) if last.direction == seg.direction && seg.gap_before == 0 => {
                let mut data = last.data.to_vec();
                data.extend_from_slice(&seg.data);
                last.data = Bytes::from(data);
                last.exit_ns = seg.exit_ns;
            }
            _ => out.push(seg.clone()),
        }
    }
    out
}

/// Events without timing and threads, for runs whose segmentation differs.
fn strip(events: Vec<Http2Event>) -> Vec<Http2Event> {
    let clear = |m: &mut H2Message| {
        m.start_ns = 0;
        m.end_ns = 0;
        m.tid = 0;
    };
    events
        .into_iter()
        .map(|e| match e {
            Http2Event::RequestStarted {
                conn_id,
                stream_id,
                headers,
                unnamed_values,
                incomplete_headers,
                ..
            } => Http2Event::RequestStarted {
                conn_id,
                stream_id,
                start_ns: 0,
                tid: 0,
                headers,
                unnamed_values,
                incomplete_headers,
            },
            Http2Event::Exchange(mut x) => {
                clear(&mut x.request);
                if let Some(r) = x.response.as_mut() {
                    clear(r);
                }
                Http2Event::Exchange(x)
            }
        })
        .collect()
}

#[test]
fn grpc_unary_ok_with_traceparent() {
    let x = exchange(
        1,
        msg(
            true,
            &grpc_request(
                "/demo.Greeter/SayHello",
                "127.0.0.1:47715",
                "5S",
                Some(TRACEPARENT),
            ),
            &[],
            client_read(1, 1),
            10,
        ),
        Some(msg(
            false,
            GRPC_OK_HEADERS,
            GRPC_OK_TRAILERS,
            server_write(4, 4),
            16,
        )),
    );
    assert_eq!(x.grpc_status(), Some(0));
    assert_eq!(x.request.field("traceparent"), Some(TRACEPARENT.as_bytes()));
    check(
        "grpc_unary_ok",
        &grpc_unary_ok(),
        &[started(&x), Http2Event::Exchange(x.clone())],
    );
}

#[test]
fn grpc_not_found_is_trailers_only() {
    let x = exchange(
        1,
        msg(
            true,
            &grpc_request("/demo.Greeter/GetItem", "127.0.0.1:44263", "5S", None),
            &[],
            client_read(2, 2),
            11,
        ),
        Some(msg(
            false,
            &[
                (":status", "200"),
                ("content-type", "application/grpc"),
                ("grpc-status", "5"),
                ("grpc-message", "no such item"),
            ],
            &[],
            server_write(6, 6),
            0,
        )),
    );
    assert_eq!(x.grpc_status(), Some(5));
    check(
        "grpc_not_found",
        &capture(include_str!("testdata/grpc_not_found.txt")),
        &[started(&x), Http2Event::Exchange(x.clone())],
    );
}

#[test]
fn grpc_server_streaming_three_messages() {
    let x = exchange(
        1,
        msg(
            true,
            &grpc_request(
                "/demo.Greeter/Count",
                "127.0.0.1:60723",
                "5S",
                Some(TRACEPARENT),
            ),
            &[],
            client_read(2, 2),
            6,
        ),
        // Headers in read 5, one message per read after, trailers in read 10.
        Some(msg(
            false,
            GRPC_OK_HEADERS,
            GRPC_OK_TRAILERS,
            server_write(5, 10),
            48,
        )),
    );
    check(
        "grpc_server_streaming",
        &capture(include_str!("testdata/grpc_server_streaming.txt")),
        &[started(&x), Http2Event::Exchange(x.clone())],
    );
}

#[test]
fn grpc_concurrent_streams_interleave() {
    let authority = "127.0.0.1:43919";
    let warm = exchange(
        1,
        msg(
            true,
            &grpc_request("/demo.Greeter/SayHello", authority, "5S", None),
            &[],
            client_read(2, 2),
            9,
        ),
        Some(msg(
            false,
            GRPC_OK_HEADERS,
            GRPC_OK_TRAILERS,
            server_write(5, 5),
            15,
        )),
    );
    let count = |stream, timeout, req_read, resp: (usize, usize)| {
        exchange(
            stream,
            msg(
                true,
                &grpc_request("/demo.Greeter/Count", authority, timeout, None),
                &[],
                client_read(req_read, req_read),
                7,
            ),
            Some(msg(
                false,
                GRPC_OK_HEADERS,
                GRPC_OK_TRAILERS,
                server_write(resp.0, resp.1),
                51,
            )),
        )
    };
    // The three calls' responses share reads 12 to 17: their frames interleave.
    let s3 = count(3, "5S", 8, (11, 16));
    let s5 = count(5, "5010m", 9, (12, 17));
    let s7 = count(7, "5S", 10, (12, 17));
    check(
        "grpc_concurrent",
        &capture(include_str!("testdata/grpc_concurrent.txt")),
        &[
            started(&warm),
            Http2Event::Exchange(warm.clone()),
            started(&s3),
            started(&s5),
            started(&s7),
            Http2Event::Exchange(s3),
            Http2Event::Exchange(s5),
            Http2Event::Exchange(s7),
        ],
    );
}

#[test]
fn curl_prior_knowledge_get() {
    let x = exchange(
        1,
        msg(
            true,
            &[
                (":method", "GET"),
                (":path", "/hello?x=1"),
                (":scheme", "http"),
                (":authority", "127.0.0.1:37081"),
                ("user-agent", "curl/7.88.1"),
                ("accept", "*/*"),
            ],
            &[],
            client_read(0, 0),
            0,
        ),
        Some(msg(
            false,
            &[
                (":status", "200"),
                ("content-type", "text/plain"),
                ("date", "Sat, 21 Nov 2026 14:31:54 GMT"),
            ],
            &[],
            server_write(3, 3),
            6,
        )),
    );
    assert_eq!(x.response.as_ref().unwrap().status(), Some(200));
    check(
        "curl_prior_knowledge",
        &capture(include_str!("testdata/curl_prior_knowledge.txt")),
        &[started(&x), Http2Event::Exchange(x.clone())],
    );
}

/// The LCG string node_features.js sends as `x-big`, computed in doubles as JavaScript does.
fn node_big_header() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let mut x: f64 = 1.0;
    (0..30_000)
        .map(|_| {
            x = (x * 1_103_515_245.0 + 12_345.0) % 2_147_483_648.0;
            ALPHABET[(x % 62.0) as usize] as char
        })
        .collect()
}

#[test]
fn node_features_push_padding_priority_continuation_trailers_resets() {
    let authority = "127.0.0.1:58767";
    let date = "Sat, 21 Nov 2026 14:42:40 GMT";
    let get = |path| {
        vec![
            (":path", path),
            (":method", "GET"),
            (":authority", authority),
            (":scheme", "http"),
        ]
    };
    // Stream 1: the page, whose response comes with a pushed stylesheet (stream 2).
    let push = exchange(
        1,
        msg(true, &get("/push"), &[], client_read(1, 1), 0),
        Some(msg(
            false,
            &[
                (":status", "200"),
                ("content-type", "text/html"),
                ("date", date),
            ],
            &[],
            server_write(2, 2),
            38,
        )),
    );
    let pushed = Http2Exchange {
        pushed: true,
        ..exchange(
            2,
            msg(false, &get("/pushed.css"), &[], server_write(2, 2), 0),
            Some(msg(
                false,
                &[
                    (":status", "200"),
                    ("content-type", "text/css"),
                    ("date", date),
                ],
                &[],
                server_write(2, 2),
                6,
            )),
        )
    };
    // Stream 3: padded HEADERS with priority, 5000 padded body bytes, response trailers.
    let upload = exchange(
        3,
        msg(
            true,
            &[
                (":method", "POST"),
                (":path", "/upload"),
                (":authority", authority),
                (":scheme", "http"),
                ("content-type", "application/octet-stream"),
            ],
            &[],
            client_read(3, 3),
            5000,
        ),
        Some(msg(
            false,
            &[(":status", "200"), ("date", date)],
            &[("x-received", "5000")],
            server_write(4, 6),
            2,
        )),
    );
    // Stream 5: a header block in HEADERS + CONTINUATION.
    let big_value = node_big_header();
    let mut big_get = get("/big");
    big_get.push(("x-big", &big_value));
    let big = exchange(
        5,
        msg(true, &big_get, &[], client_read(7, 7), 0),
        Some(msg(
            false,
            &[(":status", "200"), ("x-big-len", "30000"), ("date", date)],
            &[],
            server_write(8, 8),
            3,
        )),
    );
    // Stream 7: 103 Early Hints first.
    let early = Http2Exchange {
        interim: vec![103],
        ..exchange(
            7,
            msg(true, &get("/early"), &[], client_read(9, 9), 0),
            Some(msg(
                false,
                &[(":status", "200"), ("date", date)],
                &[],
                server_write(10, 10),
                5,
            )),
        )
    };
    // Stream 9: reset by the client (CANCEL); stream 11: by the server (REFUSED_STREAM).
    let slow = Http2Exchange {
        reset: Some(8),
        ..exchange(
            9,
            msg(true, &get("/slow"), &[], client_read(11, 11), 0),
            None,
        )
    };
    let refuse = Http2Exchange {
        reset: Some(7),
        ..exchange(
            11,
            msg(true, &get("/refuse"), &[], client_read(13, 13), 0),
            None,
        )
    };
    let c = capture(include_str!("testdata/node_features.txt"));
    check(
        "node_features",
        &c,
        &[
            started(&push),
            started(&pushed),
            Http2Event::Exchange(push),
            Http2Event::Exchange(pushed),
            started(&upload),
            Http2Event::Exchange(upload),
            started(&big),
            Http2Event::Exchange(big),
            started(&early),
            Http2Event::Exchange(early),
            started(&slow),
            Http2Event::Exchange(slow),
            started(&refuse),
            Http2Event::Exchange(refuse),
        ],
    );
    // The server announced a 256-octet table: the client's encoder followed with a size
    // update, which our decoder of its blocks applied.
    let mut conn = Http2Connection::new(CONN, Side::Server, Http2Limits::default());
    let (mut events, mut errors) = (Vec::new(), Vec::new());
    for seg in &segments(&c, Side::Server) {
        conn.push(seg, &mut events, &mut errors);
    }
    assert_eq!(conn.st.hpack[index(I)].max_size(), Some(256));
    assert!(conn.hpack_synced(I) && conn.hpack_synced(E));
}

/// The HTTP/1.1 request and the 101 head of an upgraded connection, with where each ends.
fn upgrade_request(c: &Capture) -> UpgradeRequest {
    let request = &c.reads[0].1;
    let response = &c.reads[1].1;
    let head_end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert_eq!(head_end(request), request.len());
    let text = std::str::from_utf8(&request[..head_end(request)]).unwrap();
    let mut lines = text.split("\r\n");
    let mut start = lines.next().unwrap().split(' ');
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(n, v)| (n.to_owned().into(), Bytes::copy_from_slice(v.as_bytes())))
        .collect();
    UpgradeRequest {
        method: start.next().unwrap().to_owned(),
        target: start.next().unwrap().to_owned(),
        headers,
        start_ns: exit_ns(0),
        end_ns: exit_ns(0),
        tid: CLIENT_TID,
        body_bytes: 0,
        request_dir_pos: request.len() as u64,
        response_dir_pos: head_end(response) as u64,
    }
}

#[test]
fn curl_upgrade_h2c_makes_the_upgrade_request_stream_1() {
    let c = capture(include_str!("testdata/curl_upgrade_h2c.txt"));
    let x = exchange(
        1,
        msg(
            true,
            &[
                (":method", "GET"),
                (":scheme", "http"),
                (":path", "/upgrade-me"),
                (":authority", "127.0.0.1:58621"),
                ("user-agent", "curl/7.88.1"),
                ("accept", "*/*"),
            ],
            &[],
            client_read(0, 0),
            0,
        ),
        // The 101 is read 1; the server's SETTINGS are read 3, its response reads 5 and 6.
        Some(msg(
            false,
            &[
                (":status", "200"),
                ("content-type", "text/plain"),
                ("date", "Sat, 21 Nov 2026 14:31:55 GMT"),
                ("server", "hypercorn-h2"),
            ],
            &[],
            server_write(5, 6),
            9,
        )),
    );
    let want = [started(&x), Http2Event::Exchange(x.clone())];
    let limits = Http2Limits::default();
    // Fed whole, HTTP/1.1 bytes included: the positions skip them.
    for (name, segs) in [
        ("as recorded", segments(&c, Side::Server)),
        (
            "one-byte segments",
            one_byte_pieces(&segments(&c, Side::Server)),
        ),
    ] {
        let conn = Http2Connection::upgraded(CONN, Side::Server, limits, upgrade_request(&c));
        let got = run(conn, &segs, limits);
        assert_eq!(got.events, want, "{name}");
        assert_eq!(got.errors, [], "{name}");
    }
    // As the client, with only the HTTP/2 bytes fed.
    let mut segs = segments(&c, Side::Client);
    let request = UpgradeRequest {
        request_dir_pos: 0,
        response_dir_pos: 0,
        ..upgrade_request(&c)
    };
    let (req_len, head_len) = (c.reads[0].1.len(), request_dir_len(&c));
    segs.remove(0);
    segs[0].data = segs[0].data.slice(head_len..);
    segs[0].pos += head_len as u64;
    for seg in segs.iter_mut() {
        let skip = if seg.direction == E {
            req_len
        } else {
            head_len
        } as u64;
        seg.pos -= skip;
    }
    let conn = Http2Connection::upgraded(CONN, Side::Client, limits, request);
    let got = run(conn, &segs, limits);
    assert_eq!(strip(got.events), strip(want.to_vec()));
    assert_eq!(got.errors, []);
}

fn request_dir_len(c: &Capture) -> usize {
    c.reads[1]
        .1
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap()
        + 4
}

fn grpc_many_calls() -> Capture {
    capture(include_str!("testdata/grpc_many_calls.txt"))
}

/// All bytes one side sent.
fn stream_of(c: &Capture, from_client: bool) -> Vec<u8> {
    c.reads
        .iter()
        .filter(|(fc, _)| *fc == from_client)
        .flat_map(|(_, d)| d.iter().copied())
        .collect()
}

/// The frames one side sent: offset of each frame header in its stream, and the header.
fn frames_of(c: &Capture, from_client: bool) -> Vec<(usize, frame::FrameHeader)> {
    let bytes = stream_of(c, from_client);
    let mut at = if bytes.starts_with(frame::PREFACE) {
        24
    } else {
        0
    };
    let mut out = Vec::new();
    while at + frame::HEADER_LEN <= bytes.len() {
        let h = frame::FrameHeader::parse(bytes[at..at + 9].try_into().unwrap());
        out.push((at, h));
        at += 9 + h.len as usize;
    }
    out
}

/// Like `segments`, with the bytes at `lost` (offsets in the stream of the side given) taken
/// out: the segment after them carries the gap, as reassembly delivers it.
fn segments_losing(
    c: &Capture,
    side: Side,
    from_client: bool,
    lost: std::ops::Range<usize>,
) -> Vec<Segment> {
    losing(c, side, &[(from_client, lost)])
}

/// `segments` with any number of losses, each in the stream of the side given.
fn losing(c: &Capture, side: Side, losses: &[(bool, std::ops::Range<usize>)]) -> Vec<Segment> {
    let mut out = Vec::new();
    let mut gap = [0u64; 2];
    let mut offset = [0usize; 2];
    for seg in segments(c, side) {
        let from_client = seg.direction == client_dir(side);
        let k = usize::from(from_client);
        let (start, end) = (offset[k], offset[k] + seg.data.len());
        offset[k] = end;
        // Which bytes of this segment survive.
        let mut keep = vec![true; seg.data.len()];
        for (side_lost, range) in losses {
            if *side_lost == from_client {
                for at in range.start.max(start)..range.end.min(end) {
                    keep[at - start] = false;
                }
            }
        }
        let mut i = 0;
        while i < keep.len() {
            if !keep[i] {
                gap[k] += 1;
                i += 1;
                continue;
            }
            let run = keep[i..].iter().take_while(|&&x| x).count();
            out.push(Segment {
                pos: seg.pos + i as u64,
                data: seg.data.slice(i..i + run),
                gap_before: std::mem::take(&mut gap[k]),
                ..seg.clone()
            });
            i += run;
        }
        if keep.is_empty() {
            out.push(Segment {
                gap_before: std::mem::take(&mut gap[k]),
                ..seg
            });
        }
    }
    for (k, gap) in gap.into_iter().enumerate() {
        if gap > 0 {
            let from_client = k == 1;
            let direction = if from_client {
                client_dir(side)
            } else {
                other(client_dir(side))
            };
            out.push(Segment {
                conn_id: CONN,
                direction,
                tid: 0,
                pos: offset[k] as u64,
                data: Bytes::new(),
                gap_before: gap,
                enter_ns: 0,
                exit_ns: 0,
            });
        }
    }
    out
}

fn by_stream(out: &Outcome) -> BTreeMap<u32, Http2Exchange> {
    out.exchanges()
        .into_iter()
        .map(|x| (x.stream_id, x.clone()))
        .collect()
}

/// `part` is `whole` with some fields left out, in the same order: nothing decoded wrongly.
fn is_sublist(part: &[Field], whole: &[Field]) -> bool {
    let mut rest = whole.iter();
    part.iter().all(|f| rest.any(|w| w == f))
}

/// Every field decoded in `got` is a field of the same stream in `truth`, in order.
fn assert_never_wrong(got: &BTreeMap<u32, Http2Exchange>, truth: &BTreeMap<u32, Http2Exchange>) {
    for (id, x) in got {
        let t = &truth[id];
        assert!(
            is_sublist(&x.request.headers, &t.request.headers),
            "stream {id} request"
        );
        assert!(
            is_sublist(&x.request.trailers, &t.request.trailers),
            "stream {id}"
        );
        if let (Some(r), Some(tr)) = (&x.response, &t.response) {
            assert!(is_sublist(&r.headers, &tr.headers), "stream {id} response");
            assert!(
                is_sublist(&r.trailers, &tr.trailers),
                "stream {id} trailers"
            );
        }
        let values = |m: &H2Message| -> Vec<Bytes> {
            m.headers
                .iter()
                .chain(&m.trailers)
                .map(|(_, v)| v.clone())
                .collect()
        };
        for v in &x.request.unnamed_values {
            assert!(values(&t.request).contains(v), "stream {id} unnamed {v:?}");
        }
        if !x.incomplete_headers {
            assert_eq!(x.request.headers, t.request.headers, "stream {id} complete");
            assert!(x.request.unnamed_values.is_empty());
        }
    }
}

/// From which stream on every request decodes exactly but for the traceparent, whose value
/// is unnamed: its name comes from the newest entry named so, which is unknown since the loss
/// (see `hpack`). Everything before the loss is provably evicted by then.
fn exact_but_traceparent_from(
    got: &BTreeMap<u32, Http2Exchange>,
    truth: &BTreeMap<u32, Http2Exchange>,
) -> u32 {
    let exact = |x: &Http2Exchange| {
        let t = &truth[&x.stream_id].request;
        let tp = t.field("traceparent").unwrap();
        let others: Vec<_> = t
            .headers
            .iter()
            .filter(|(n, _)| n != "traceparent")
            .cloned()
            .collect();
        x.request.headers == others && x.request.unnamed_values == [Bytes::copy_from_slice(tp)]
    };
    let first = got
        .values()
        .find(|x| exact(x))
        .expect("never decoded again")
        .stream_id;
    assert!(
        got.range(first..).all(|(_, x)| exact(x)),
        "exact from {first} on"
    );
    first
}

#[test]
fn gap_inside_data_payloads_costs_nothing() {
    let c = capture(include_str!("testdata/grpc_server_streaming.txt"));
    let truth = feed(Side::Server, &segments(&c, Side::Server));
    let data: Vec<_> = frames_of(&c, false)
        .into_iter()
        .filter(|(_, h)| h.ty == 0 && h.len >= 10)
        .collect();
    assert_eq!(data.len(), 3);
    // Inside the first message, and the tail of the last (the next read carries the gap).
    let (a, ha) = data[0];
    let (b, hb) = data[2];
    let end_b = b + 9 + hb.len as usize;
    for lost in [a + 12..a + 9 + ha.len as usize - 3, end_b - 10..end_b] {
        let segs = segments_losing(&c, Side::Server, false, lost.clone());
        assert!(segs.iter().any(|s| s.gap_before > 0));
        let got = feed(Side::Server, &segs);
        assert_eq!(got.events, truth.events, "{lost:?}");
        assert_eq!(got.errors, [], "{lost:?}");
    }
    // The lost bytes still count as body.
    assert_eq!(
        truth.exchanges()[0].response.as_ref().unwrap().body_bytes,
        48
    );
}

fn h2_many_requests() -> Capture {
    capture(include_str!("testdata/h2_many_requests.txt"))
}

/// Feeds a capture with the bytes at `lost` of the client's stream taken out of the
/// HEADERS frame of `stream`, and checks the losses against the complete run.
fn lose_in_request_block(c: &Capture, stream: u32) -> (BTreeMap<u32, Http2Exchange>, Outcome) {
    let truth = by_stream(&feed(Side::Server, &segments(c, Side::Server)));
    let (at, h) = frames_of(c, true)
        .into_iter()
        .find(|(_, h)| h.ty == 1 && h.stream == stream)
        .unwrap();
    assert!(h.len > 30);
    let out = feed(
        Side::Server,
        &segments_losing(c, Side::Server, true, at + 15..at + 25),
    );
    let got = by_stream(&out);
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        truth.keys().collect::<Vec<_>>()
    );
    assert_never_wrong(&got, &truth);
    let gaps = out
        .errors
        .iter()
        .filter(|e| **e == Http2Error::GapInHeaderBlock);
    assert_eq!(gaps.count(), 1);
    assert!(!out.errors.contains(&Http2Error::HpackDesync));
    // The block's own fields are gone; its timing and its response are not.
    let lost = &got[&stream];
    assert!(lost.incomplete_headers && lost.request.headers.is_empty());
    assert_eq!(lost.response, truth[&stream].response);
    assert_eq!(lost.request.start_ns, truth[&stream].request.start_ns);
    (truth, out)
}

#[test]
fn gap_in_a_grpc_request_header_block_keeps_what_needs_no_table() {
    let (truth, out) = lose_in_request_block(&grpc_many_calls(), 11);
    let got = by_stream(&out);
    // grpc-core refers to the entries it inserted at the start for every call, so later
    // requests stay incomplete; but it sends traceparent as a literal without indexing, and
    // the method comes from the static table: both survive every loss.
    for id in (13..=119).step_by(2) {
        let (x, t) = (&got[&id], &truth[&id]);
        assert!(x.incomplete_headers, "stream {id}");
        assert_eq!(
            x.request.field(":method"),
            Some(&b"POST"[..]),
            "stream {id}"
        );
        assert_eq!(
            x.request.field("traceparent"),
            t.request.field("traceparent")
        );
        assert!(x.request.field("traceparent").is_some());
    }
}

#[test]
fn gap_in_a_request_header_block_is_recovered_from_once_old_entries_are_evicted() {
    let (truth, out) = lose_in_request_block(&h2_many_requests(), 11);
    let got = by_stream(&out);
    // python-h2 inserts each request's path and traceparent: once they alone overflow the
    // 4096-octet table, nothing from before the loss can remain.
    let first = exact_but_traceparent_from(&got, &truth);
    assert!(first <= 91, "{first}");
    assert!(out.errors.contains(&Http2Error::HeadersIncomplete));
    // Responses were not touched by the loss.
    for (id, x) in &got {
        assert_eq!(x.response, truth[id].response);
    }
}

#[test]
fn gap_across_a_frame_header_resyncs_on_frames() {
    let c = grpc_many_calls();
    let truth = by_stream(&feed(Side::Server, &segments(&c, Side::Server)));
    // From inside the response message of stream 21 into the frame after it.
    let frames = frames_of(&c, false);
    let k = frames
        .iter()
        .position(|(_, h)| h.ty == 0 && h.stream == 21 && h.len > 5)
        .unwrap();
    let (at, h) = frames[k];
    let next = frames[k + 1].0;
    let segs = segments_losing(&c, Side::Server, false, at + 9 + 3..next + 4);
    assert!(at + 9 + h.len as usize == next);
    let out = feed(Side::Server, &segs);
    let got = by_stream(&out);
    assert_never_wrong(&got, &truth);
    assert!(out.errors.contains(&Http2Error::GapInFrameHeader));
    assert_eq!(got.len(), 60);
    // Every later exchange is paired with its response again.
    for id in (23..=119).step_by(2) {
        let r = got[&id].response.as_ref().expect("response");
        assert_eq!(r.status(), Some(200), "stream {id}");
        assert!(!r.truncated, "stream {id}");
    }
}

/// Joins a capture at the read holding the client's HEADERS for `stream`.
fn join_at(c: &Capture, stream: u32) -> (BTreeMap<u32, Http2Exchange>, Outcome) {
    let truth = by_stream(&feed(Side::Server, &segments(c, Side::Server)));
    let (at, _) = frames_of(c, true)
        .into_iter()
        .find(|(_, h)| h.ty == 1 && h.stream == stream)
        .unwrap();
    let all = segments(c, Side::Server);
    let join = all
        .iter()
        .position(|s| s.direction == I && s.pos == at as u64)
        .expect("the request starts a read");
    let limits = Http2Limits::default();
    let out = run(
        Http2Connection::midstream(CONN, Side::Unknown, limits),
        &all[join..],
        limits,
    );
    let got = by_stream(&out);
    assert_eq!(out.side, Side::Server);
    assert_never_wrong(&got, &truth);
    assert!(!out.errors.contains(&Http2Error::HpackDesync));
    assert_eq!(got.keys().next(), Some(&stream));
    assert_eq!(got.len(), truth.range(stream..).count());
    for (id, x) in &got {
        // Static-table fields decode from the first block on.
        assert_eq!(
            x.request.field(":scheme"),
            Some(&b"http"[..]),
            "stream {id}"
        );
        assert_eq!(
            x.response.as_ref().unwrap().status(),
            Some(200),
            "stream {id}"
        );
    }
    (truth, out)
}

#[test]
fn grpc_connection_joined_midstream_yields_method_status_and_traceparent() {
    let (truth, out) = join_at(&grpc_many_calls(), 21);
    for (id, x) in by_stream(&out) {
        assert!(x.incomplete_headers, "stream {id}");
        assert_eq!(x.request.field(":method"), Some(&b"POST"[..]));
        assert_eq!(
            x.request.field("traceparent"),
            truth[&id].request.field("traceparent")
        );
        assert!(x.request.field("traceparent").is_some());
    }
}

#[test]
fn connection_joined_midstream_decodes_exactly_again_once_old_entries_are_evicted() {
    let (truth, out) = join_at(&h2_many_requests(), 21);
    let got = by_stream(&out);
    assert!(got[&21].incomplete_headers);
    assert_eq!(got[&21].request.field(":method"), Some(&b"GET"[..]));
    let first = exact_but_traceparent_from(&got, &truth);
    assert!(first <= 101, "{first}");
    println!("requests exact but for the traceparent name from stream {first} on");
}

// Hand-built frames for what real peers rarely do: broken framing, limits, GOAWAY.

fn frame(ty: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = len.to_be_bytes()[1..].to_vec();
    f.extend_from_slice(&[ty, flags]);
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A literal field without indexing, new name, raw strings.
fn lit(name: &str, value: &str) -> Vec<u8> {
    let mut b = vec![0x00, name.len() as u8];
    b.extend_from_slice(name.as_bytes());
    b.push(value.len() as u8);
    b.extend_from_slice(value.as_bytes());
    b
}

/// GET (static 2), http (static 6), and `:path` as a literal: decodable without any state.
fn get_block(path: &str) -> Vec<u8> {
    let mut b = vec![0x82, 0x86];
    b.extend(lit(":path", path));
    b
}

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const OK_200: &[u8] = &[0x88];

/// Segments from (from client, bytes) pairs, read k at `enter_ns(k)`.
fn script(reads: &[(bool, Vec<u8>)]) -> Vec<Segment> {
    let c = Capture {
        reads: reads
            .iter()
            .map(|(fc, b)| (*fc, Bytes::copy_from_slice(b)))
            .collect(),
    };
    segments(&c, Side::Server)
}

fn preface_and(frames: &[Vec<u8>]) -> Vec<u8> {
    let mut b = frame::PREFACE.to_vec();
    b.extend(frame(4, 0, 0, &[]));
    b.extend(frames.concat());
    b
}

fn paths(out: &Outcome) -> Vec<(u32, Option<Bytes>, Option<u16>)> {
    out.exchanges()
        .iter()
        .map(|x| {
            (
                x.stream_id,
                x.request.field(":path").map(Bytes::copy_from_slice),
                x.response.as_ref().and_then(H2Message::status),
            )
        })
        .collect()
}

fn p(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

#[test]
fn a_frame_inside_a_header_block_loses_the_block() {
    let segs = script(&[
        (
            true,
            preface_and(&[
                // HEADERS without END_HEADERS, then a DATA frame where CONTINUATION must be.
                frame(1, END_STREAM, 1, &get_block("/a")),
                frame(0, 0, 1, b"x"),
                frame(1, END_STREAM | END_HEADERS, 3, &get_block("/b")),
            ]),
        ),
        (
            false,
            [
                frame(1, END_HEADERS | END_STREAM, 1, OK_200),
                frame(1, END_HEADERS | END_STREAM, 3, OK_200),
            ]
            .concat(),
        ),
    ]);
    let out = feed(Side::Server, &segs);
    assert_eq!(out.errors, [Http2Error::BadFrame]);
    // Stream 1's request is known only by its timing; stream 3 decodes: all its fields are
    // static or literal.
    assert_eq!(paths(&out), [(1, None, Some(200)), (3, p("/b"), Some(200))]);
    assert!(out.exchanges()[0].incomplete_headers);
    assert!(!out.exchanges()[1].incomplete_headers);
}

#[test]
fn padding_longer_than_the_frame_is_a_bad_frame() {
    let mut padded = vec![200u8];
    padded.extend(get_block("/a"));
    let segs = script(&[(
        true,
        preface_and(&[
            frame(1, END_STREAM | END_HEADERS | 0x8, 1, &padded),
            frame(1, END_STREAM | END_HEADERS, 3, &get_block("/b")),
        ]),
    )]);
    let out = feed(Side::Server, &segs);
    assert_eq!(
        out.errors,
        [
            Http2Error::BadFrame,
            Http2Error::Truncated,
            Http2Error::Truncated
        ]
    );
    assert_eq!(paths(&out), [(1, None, None), (3, p("/b"), None)]);
}

#[test]
fn header_block_over_the_limit_is_skipped_and_costs_the_hpack_state() {
    let limits = Http2Limits {
        max_header_block_bytes: 64,
        ..Http2Limits::default()
    };
    let mut big = get_block("/big");
    big.extend(lit("x-pad", &"p".repeat(100)));
    // An indexed-with-insertion field after the loss refers to nothing we know.
    let mut after = get_block("/after");
    after.push(0xbe);
    let segs = script(&[(
        true,
        preface_and(&[
            frame(1, END_STREAM | END_HEADERS, 1, &big),
            frame(1, END_STREAM | END_HEADERS, 3, &after),
        ]),
    )]);
    let out = run(
        Http2Connection::new(CONN, Side::Server, limits),
        &segs,
        limits,
    );
    assert_eq!(
        out.errors,
        [
            Http2Error::HeaderBlockTooLarge,
            Http2Error::HeadersIncomplete,
            Http2Error::Truncated,
            Http2Error::Truncated
        ]
    );
    assert_eq!(paths(&out), [(1, None, None), (3, p("/after"), None)]);
    assert!(out.exchanges().iter().all(|x| x.incomplete_headers));
}

#[test]
fn decoded_header_list_over_the_limit_keeps_the_first_fields() {
    let limits = Http2Limits {
        max_header_list_bytes: 40,
        ..Http2Limits::default()
    };
    let mut block = get_block("/a");
    block.extend(lit("x-1", &"1".repeat(20)));
    block.extend(lit("x-2", "2"));
    let segs = script(&[
        (
            true,
            preface_and(&[frame(1, END_STREAM | END_HEADERS, 1, &block)]),
        ),
        (false, frame(1, END_STREAM | END_HEADERS, 1, OK_200)),
    ]);
    let out = run(
        Http2Connection::new(CONN, Side::Server, limits),
        &segs,
        limits,
    );
    assert_eq!(out.errors, [Http2Error::HeadersTooLarge]);
    let x = out.exchanges()[0];
    assert_eq!(
        x.request.headers,
        fields(&[(":method", "GET"), (":scheme", "http"), (":path", "/a")])
    );
    assert!(x.incomplete_headers);
}

#[test]
fn stream_limit_emits_the_oldest_stream() {
    let limits = Http2Limits {
        max_streams: 2,
        ..Http2Limits::default()
    };
    let reqs: Vec<Vec<u8>> = [1, 3, 5]
        .iter()
        .map(|&id| {
            frame(
                1,
                END_STREAM | END_HEADERS,
                id,
                &get_block(&format!("/{id}")),
            )
        })
        .collect();
    let segs = script(&[
        (true, preface_and(&reqs)),
        (false, frame(1, END_STREAM | END_HEADERS, 1, OK_200)),
        (false, frame(1, END_STREAM | END_HEADERS, 5, OK_200)),
    ]);
    let out = run(
        Http2Connection::new(CONN, Side::Server, limits),
        &segs,
        limits,
    );
    assert_eq!(
        out.errors,
        [
            Http2Error::StreamLimit,
            Http2Error::UnknownStream,
            Http2Error::Truncated
        ]
    );
    assert_eq!(
        paths(&out),
        [
            (1, p("/1"), None),
            (5, p("/5"), Some(200)),
            (3, p("/3"), None)
        ]
    );
}

#[test]
fn goaway_ends_the_streams_it_says_were_not_processed() {
    let mut goaway = 1u32.to_be_bytes().to_vec();
    goaway.extend(0u32.to_be_bytes()); // NO_ERROR
    let segs = script(&[
        (
            true,
            preface_and(&[
                frame(1, END_STREAM | END_HEADERS, 1, &get_block("/1")),
                frame(1, END_STREAM | END_HEADERS, 3, &get_block("/3")),
            ]),
        ),
        (false, frame(7, 0, 0, &goaway)),
        (false, frame(1, END_STREAM | END_HEADERS, 1, OK_200)),
    ]);
    let out = feed(Side::Server, &segs);
    assert_eq!(out.errors, []);
    assert_eq!(paths(&out), [(3, p("/3"), None), (1, p("/1"), Some(200))]);
    assert!(!out.exchanges()[0].request.truncated);
}

#[test]
fn frames_of_streams_never_opened_are_counted_and_ignored() {
    let segs = script(&[
        (true, preface_and(&[])),
        // A response, body and reset for stream 5, whose request was never seen.
        (
            false,
            [
                frame(1, END_HEADERS, 5, OK_200),
                frame(0, END_STREAM, 5, b"body"),
                frame(3, 0, 5, &8u32.to_be_bytes()),
            ]
            .concat(),
        ),
    ]);
    let out = feed(Side::Server, &segs);
    assert_eq!(out.errors, [Http2Error::UnknownStream]);
    assert_eq!(out.events, []);
}

#[test]
fn close_mid_message_reports_what_was_seen() {
    let segs = script(&[
        (
            true,
            preface_and(&[frame(1, END_STREAM | END_HEADERS, 1, &get_block("/slow"))]),
        ),
        // The response's headers and half a DATA frame, then the connection closes.
        (
            false,
            [
                frame(1, END_HEADERS, 1, OK_200),
                frame(0, END_STREAM, 1, b"0123456789")[..14].to_vec(),
            ]
            .concat(),
        ),
    ]);
    let out = feed(Side::Server, &segs);
    assert_eq!(out.errors, [Http2Error::Truncated]);
    let x = out.exchanges()[0];
    let r = x.response.as_ref().unwrap();
    assert!(r.truncated && !x.request.truncated);
    assert_eq!(r.body_bytes, 5);
}

#[test]
fn a_stream_that_is_not_http2_stops_the_parser() {
    // Joined mid-way on bytes that never look like frames.
    let noise: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8 | 0x80).collect();
    let limits = Http2Limits::default();
    let mut conn = Http2Connection::midstream(CONN, Side::Server, limits);
    let (mut events, mut errors) = (Vec::new(), Vec::new());
    for seg in script(&[(true, noise)]) {
        conn.push(&seg, &mut events, &mut errors);
    }
    assert!(conn.is_done());
    assert_eq!(errors, [Http2Error::NotHttp2]);
    assert_eq!(events, []);
}

#[test]
fn a_bad_frame_header_resyncs_at_the_next_syscall() {
    let segs = script(&[
        (
            true,
            preface_and(&[frame(1, END_STREAM | END_HEADERS, 1, &get_block("/1"))]),
        ),
        (false, frame(1, END_STREAM | END_HEADERS, 1, OK_200)),
        // A PING with a wrong length: the HEADERS after it is found again because it ends
        // exactly where the read does.
        (
            true,
            [
                frame(6, 0, 0, &[0; 3]),
                frame(1, END_STREAM | END_HEADERS, 3, &get_block("/3")),
            ]
            .concat(),
        ),
        (
            true,
            frame(1, END_STREAM | END_HEADERS, 5, &get_block("/5")),
        ),
        (false, frame(1, END_STREAM | END_HEADERS, 5, OK_200)),
    ]);
    let out = feed(Side::Server, &segs);
    assert_eq!(out.errors, [Http2Error::BadFrame, Http2Error::Truncated]);
    assert_eq!(
        paths(&out),
        [
            (1, p("/1"), Some(200)),
            (5, p("/5"), Some(200)),
            (3, p("/3"), None)
        ]
    );
}

#[test]
fn detect_preface_and_midstream_frames() {
    let preface = frame::PREFACE;
    assert_eq!(detect(preface), Some(true));
    assert_eq!(
        detect(&[preface.as_slice(), b"\0\0\0\x04"].concat()),
        Some(true)
    );
    assert_eq!(detect(&preface[..10]), None);
    assert_eq!(detect(b""), None);
    assert_eq!(detect(b"GET / HTTP/1.1\r\n"), Some(false));
    assert_eq!(detect(b"PRI * HTTP/1.1\r\n"), Some(false));
    assert_eq!(detect(&[0x16, 0x03, 0x01]), Some(false));

    let settings = frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]);
    let headers = frame(1, END_HEADERS, 1, OK_200);
    let data = frame(0, END_STREAM, 1, b"hello");
    let cases: [(&str, Vec<u8>, Option<bool>); 9] = [
        ("one frame exactly", headers.clone(), Some(true)),
        (
            "a run of frames",
            [headers.clone(), data.clone(), settings.clone()].concat(),
            Some(true),
        ),
        (
            "a frame and part of the next header",
            [data.clone(), settings[..4].to_vec()].concat(),
            None,
        ),
        ("part of a frame", data[..12].to_vec(), None),
        ("less than a header", settings[..5].to_vec(), None),
        (
            "HTTP/1",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            Some(false),
        ),
        (
            "TLS",
            vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03],
            Some(false),
        ),
        (
            "mid-frame bytes",
            b"hello world, some body".to_vec(),
            Some(false),
        ),
        (
            "frame then garbage",
            [data, b"garbage!!!".to_vec()].concat(),
            Some(false),
        ),
    ];
    for (name, bytes, want) in cases {
        assert_eq!(detect_midstream(&bytes), want, "{name}");
    }
}

#[test]
fn error_names_are_distinct() {
    let names: std::collections::HashSet<_> = Http2Error::ALL.iter().map(|e| e.as_str()).collect();
    assert_eq!(names.len(), Http2Error::ALL.len());
    let snake = |n: &str| {
        n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    };
    assert!(names.iter().all(|n| snake(n)));
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

    /// Any bytes, gaps and segmentation, in every mode: no panic, memory within the limits.
    #[test]
    fn arbitrary_input_is_survivable(data in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..2048)) {
        fuzz_feed(&data);
    }

    /// A real connection joined at a random read or not, cut at random places into
    /// segments, with random losses: no panic, and whatever is decoded is exactly what was
    /// sent.
    #[test]
    fn real_traffic_with_random_cuts_and_losses_is_never_decoded_wrongly(
        cuts in proptest::collection::vec(0usize..30_000, 0..40),
        losses in proptest::collection::vec((0usize..12_000, 1usize..400, proptest::prelude::any::<bool>()), 0..6),
        join in proptest::option::of(0usize..100),
        unknown_side in proptest::prelude::any::<bool>(),
    ) {
        let c = if cuts.len() % 2 == 0 { grpc_many_calls() } else { h2_many_requests() };
        let truth = by_stream(&feed(Side::Server, &segments(&c, Side::Server)));
        let losses: Vec<_> = losses
            .into_iter()
            .map(|(at, len, from_client)| (from_client, at..at + len))
            .collect();
        let mut segs = losing(&c, Side::Server, &losses);
        if let Some(k) = join {
            let k = k % segs.len();
            segs.drain(..k);
            if let Some(first) = segs.first_mut() {
                first.gap_before = 0;
            }
        }
        let mut cut_segs = Vec::new();
        for (k, seg) in segs.into_iter().enumerate() {
            let at = cuts.get(k % cuts.len().max(1)).copied().unwrap_or(0) % (seg.data.len() + 1);
            if at == 0 || at == seg.data.len() {
                cut_segs.push(seg);
                continue;
            }
            cut_segs.push(Segment { data: seg.data.slice(..at), ..seg.clone() });
            cut_segs.push(Segment {
                pos: seg.pos + at as u64,
                data: seg.data.slice(at..),
                gap_before: 0,
                ..seg
            });
        }
        let side = if unknown_side { Side::Unknown } else { Side::Server };
        let limits = Http2Limits::default();
        let conn = match join {
            Some(_) => Http2Connection::midstream(CONN, side, limits),
            None => Http2Connection::new(CONN, side, limits),
        };
        let out = run(conn, &cut_segs, limits);
        if out.side != Side::Unknown {
            proptest::prop_assert_eq!(out.side, Side::Server);
        }
        assert_never_wrong(&by_stream(&out), &truth);
    }
}
