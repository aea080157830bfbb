"""An HTTP/1.1 service (ThreadingHTTPServer) whose handler calls demo.Echo/Unary: the first hop
of the gRPC chain.

    python3 http_front.py '<options JSON>'

Options: {"target": "127.0.0.1:<port>", "log": path}. Prints "READY <port>", then serves
`GET /call?payload=<text>` (default "hello"): one gRPC call from the handling thread on a
channel shared by all requests and made by the first one (so a process traced from its start
sees the connection from its first byte); answers 200, or 502 when the call failed, with
{"code", "details", "reply", "echo_traceparent"}. Anything else is 404. Each request appends
{"method": "GET <path>", "traceparent", "peer", "code": <HTTP status>} to the log.
"""

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import grpc

OPTIONS = json.loads(sys.argv[1])
log_lock = threading.Lock()
channel_lock = threading.Lock()
unary = None


def shared_unary():
    global unary
    with channel_lock:
        if unary is None:
            channel = grpc.insecure_channel(OPTIONS["target"], options=[("grpc.enable_http_proxy", 0)])
            unary = channel.unary_unary("/demo.Echo/Unary")
        return unary


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):
        pass

    def reply(self, status, payload):
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        self.record(status)

    def record(self, status):
        line = json.dumps({
            "method": "GET " + urlsplit(self.path).path,
            "traceparent": self.headers.get_all("traceparent") or [],
            "peer": "%s:%d" % self.client_address,
            "code": status,
        })
        with log_lock:
            with open(OPTIONS["log"], "a") as log:
                log.write(line + "\n")

    def do_GET(self):
        url = urlsplit(self.path)
        if url.path != "/call":
            self.reply(404, {"error": "not found"})
            return
        payload = parse_qs(url.query).get("payload", ["hello"])[0].encode()
        try:
            reply, call = shared_unary().with_call(payload, timeout=10)
            code, details, trailing = 0, "", call.trailing_metadata() or ()
            text = reply.decode(errors="replace")
        except grpc.RpcError as error:
            code, details, trailing = error.code().value[0], error.details() or "", error.trailing_metadata() or ()
            text = None
        echoed = [value for key, value in trailing if key == "echo-traceparent"]
        result = {"code": code, "details": details, "reply": text, "echo_traceparent": echoed}
        self.reply(200 if code == 0 else 502, result)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print("READY", server.server_address[1], flush=True)
server.serve_forever()
