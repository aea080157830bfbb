// The Node app of `cargo xtask bench sdk`: one JSON route on the plain `http` module, the
// module @opentelemetry/auto-instrumentations-node instruments. Untraced and under zerotel it
// runs as is; the SDK variant preloads the SDK with
// `--require @opentelemetry/auto-instrumentations-node/register`, nothing changed here.
'use strict';

const http = require('http');

const port = Number(process.env.PORT);
const route = /^\/users\/(\d+)$/;

const server = http.createServer((req, res) => {
  const m = req.method === 'GET' && route.exec(req.url);
  if (!m) {
    res.writeHead(404).end();
    return;
  }
  const id = Number(m[1]);
  const body = JSON.stringify({ id, name: `user-${id}`, active: true });
  res.writeHead(200, {
    'content-type': 'application/json',
    'content-length': Buffer.byteLength(body),
  });
  res.end(body);
});

server.listen(port, '127.0.0.1');

// SIGTERM ends the process once the server is closed, after the SDK's own SIGTERM handler (when
// preloaded) has flushed its last spans: the bench counts every span that reached its receiver.
process.on('SIGTERM', () => server.close());
