// Plain-text (h2c, prior knowledge) HTTP/2 server for capture.py: GET /hello answers "hello".
const http2 = require('http2');

const server = http2.createServer();
server.on('stream', (stream, headers) => {
  if (headers[':path'].startsWith('/hello')) {
    stream.respond({ ':status': 200, 'content-type': 'text/plain' });
    stream.end('hello\n');
  } else {
    stream.respond({ ':status': 404 });
    stream.end();
  }
});
server.listen(Number(process.argv[2]), '127.0.0.1');
