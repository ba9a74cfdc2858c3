// node's HTTP/2 (nghttp2) on both ends, exercising the framing features capture.py records:
// padded HEADERS and DATA, priority, a header block split into CONTINUATION frames, server
// push, 103 Early Hints, response trailers, RST_STREAM from each side, a 256-octet header
// table (so the client's encoder sends a dynamic table size update) and GOAWAY.
//   node node_features.js server PORT | client PORT
const http2 = require('http2');
const { PADDING_STRATEGY_MAX, NGHTTP2_CANCEL, NGHTTP2_REFUSED_STREAM } = http2.constants;

function server(port) {
  const srv = http2.createServer({
    paddingStrategy: PADDING_STRATEGY_MAX,
    settings: { headerTableSize: 256 },
  });
  srv.on('stream', (stream, headers) => {
    stream.on('error', () => {});
    const path = headers[':path'];
    if (path === '/push') {
      stream.pushStream({ ':path': '/pushed.css' }, (err, push) => {
        if (err) throw err;
        push.respond({ ':status': 200, 'content-type': 'text/css' });
        push.end('body{}');
        stream.respond({ ':status': 200, 'content-type': 'text/html' });
        stream.end('<link rel=stylesheet href=/pushed.css>');
      });
    } else if (path === '/upload') {
      let n = 0;
      stream.on('data', (c) => { n += c.length; });
      stream.on('end', () => {
        stream.respond({ ':status': 200 }, { waitForTrailers: true });
        stream.on('wantTrailers', () => stream.sendTrailers({ 'x-received': String(n) }));
        stream.end('ok');
      });
    } else if (path === '/big') {
      stream.respond({ ':status': 200, 'x-big-len': String(headers['x-big'].length) });
      stream.end('big');
    } else if (path === '/early') {
      stream.additionalHeaders({ ':status': 103, link: '</style.css>; rel=preload' });
      stream.respond({ ':status': 200 });
      stream.end('early');
    } else if (path === '/refuse') {
      stream.close(NGHTTP2_REFUSED_STREAM);
    }
    // '/slow' is never answered: the client resets it.
  });
  srv.listen(port, '127.0.0.1');
}

function request(client, headers, options, body) {
  return new Promise((resolve) => {
    const s = client.request(headers, options);
    s.on('response', () => {});
    s.on('data', () => {});
    s.on('error', () => {});
    s.on('close', resolve);
    if (body) s.end(body); else s.end();
  });
}

async function client(port) {
  const c = http2.connect(`http://127.0.0.1:${port}`, { paddingStrategy: PADDING_STRATEGY_MAX });
  c.on('stream', (pushed) => { pushed.on('data', () => {}); });
  await request(c, { ':path': '/push' });
  await request(c, { ':method': 'POST', ':path': '/upload', 'content-type': 'application/octet-stream' },
    { weight: 42 }, Buffer.alloc(5000, 7));
  // Letters and digits from a fixed LCG: about 6 bits each after Huffman coding, so the block
  // outgrows one 16 KiB frame.
  let x = 1;
  const big = Array.from({ length: 30000 }, () => {
    x = (x * 1103515245 + 12345) % 2147483648;
    return 'abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789'[x % 62];
  }).join('');
  await request(c, { ':path': '/big', 'x-big': big });
  await request(c, { ':path': '/early' });
  await new Promise((resolve) => {
    const s = c.request({ ':path': '/slow' });
    s.on('error', () => {});
    s.on('close', resolve);
    setTimeout(() => s.close(NGHTTP2_CANCEL), 50);
  });
  await request(c, { ':path': '/refuse' });
  c.close();
}

const [mode, port] = [process.argv[2], Number(process.argv[3])];
if (mode === 'server') server(port); else client(port);
