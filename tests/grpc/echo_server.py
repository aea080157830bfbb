"""The demo.Echo gRPC service on grpcio, plaintext (h2c), without generated code: generic
handlers with no (de)serializers take and return the raw message bytes.

    python3 echo_server.py '<options JSON>'

Options: {"echo_metadata": bool, "downstream": "" | "grpc://host:port" | "http://...",
"log": path}. Prints "READY <port>" once it listens on 127.0.0.1, then serves until killed.

Methods (request payloads with directives are `key=value&...`):
- Unary: echoes the request; with a downstream, calls it first (demo.Echo/Unary with the same
  payload, or an HTTP GET) and fails with the downstream's status if that fails.
- ServerStream `count=N[&status=S]`: N replies "reply <i>", then status S.
- ClientStream: reads every request, one reply `{"messages": n, "bytes": m}`.
- BidiStream: echoes each request as it arrives.
- Fail `status=N[&message=M][&sleep_ms=T]`: status N before any message (trailers-only), an
  empty reply for 0.
Any other method is UNIMPLEMENTED. Every RPC first sleeps for its `delay-ms` metadata; with
echo_metadata the `traceparent` values that arrived return as `echo-traceparent` trailing
metadata. Each finished RPC appends {"method", "traceparent", "peer", "code"} to the log.
"""

import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent import futures

import grpc

OPTIONS = json.loads(sys.argv[1])
CODES = {code.value[0]: code for code in grpc.StatusCode}
log_lock = threading.Lock()
downstream_lock = threading.Lock()
downstream_call = None


def metadata_values(context, key):
    return [value for name, value in context.invocation_metadata() if name == key]


def peer_address(context):
    # "ipv4:127.0.0.1:5000" -> "127.0.0.1:5000", as grpc-go prints it.
    return context.peer().split(":", 1)[1] if ":" in context.peer() else context.peer()


def record(method, context, peer, code):
    if not OPTIONS.get("log"):
        return
    line = json.dumps({"method": method, "traceparent": metadata_values(context, "traceparent"), "peer": peer, "code": code})
    with log_lock:
        with open(OPTIONS["log"], "a") as log:
            log.write(line + "\n")


def rpc(name, streaming_reply=False):
    """Wraps a handler: the delay, the metadata echo, and the log line with the final code."""
    method = "/demo.Echo/" + name

    def before(context):
        delay = metadata_values(context, "delay-ms")
        if delay:
            time.sleep(int(delay[0]) / 1000)
        if OPTIONS.get("echo_metadata"):
            echoed = [("echo-traceparent", value) for value in metadata_values(context, "traceparent")]
            if echoed:
                context.set_trailing_metadata(echoed)

    def final_code(context, default):
        # The code set by abort() or set_code(); else CANCELLED or DEADLINE_EXCEEDED when the
        # client gave up first; else OK, or UNKNOWN after an exception.
        code = context.code()
        if isinstance(code, grpc.StatusCode):
            return code.value[0]
        if not context.is_active():
            remaining = context.time_remaining()
            return 4 if remaining is not None and remaining <= 0 else 1
        return default

    def wrap(handler):
        if streaming_reply:
            def streaming(request, context):
                peer = peer_address(context)
                before(context)
                try:
                    yield from handler(request, context)
                except Exception:
                    record(method, context, peer, final_code(context, 2))
                    raise
                record(method, context, peer, final_code(context, 0))
            return streaming

        def plain(request, context):
            peer = peer_address(context)
            before(context)
            try:
                reply = handler(request, context)
            except Exception:
                record(method, context, peer, final_code(context, 2))
                raise
            record(method, context, peer, final_code(context, 0))
            return reply
        return plain

    return wrap


def directives(request):
    return {key: values[0] for key, values in urllib.parse.parse_qs(request.decode(errors="replace")).items()}


def set_status(context, values):
    """Sets the status of `status=N[&message=M]`, sent after the replies."""
    code = int(values.get("status", "0"))
    if code != 0:
        context.set_code(CODES[code])
        context.set_details(values.get("message", "failed with status %d" % code))


def call_downstream(request, context):
    target = OPTIONS["downstream"]
    if target.startswith("http://"):
        try:
            with urllib.request.urlopen(target, timeout=10) as response:
                response.read()
        except urllib.error.HTTPError as error:
            error.read()
            context.abort(grpc.StatusCode.UNAVAILABLE, "downstream HTTP %d" % error.code)
        except OSError as error:
            context.abort(grpc.StatusCode.UNAVAILABLE, "downstream: %s" % error)
        return
    global downstream_call
    with downstream_lock:
        # Made by the first call, so that a process traced from its start sees the connection
        # from its first byte.
        if downstream_call is None:
            channel = grpc.insecure_channel(target[len("grpc://"):], options=[("grpc.enable_http_proxy", 0)])
            downstream_call = channel.unary_unary("/demo.Echo/Unary")
    try:
        downstream_call(request, timeout=10)
    except grpc.RpcError as error:
        context.abort(error.code(), "downstream: %s" % error.details())


@rpc("Unary")
def unary(request, context):
    if OPTIONS.get("downstream"):
        call_downstream(request, context)
    return request


@rpc("Fail")
def fail(request, context):
    values = directives(request)
    time.sleep(int(values.get("sleep_ms", "0")) / 1000)
    code = int(values.get("status", "0"))
    if code != 0:
        # abort() before any message: a trailers-only response (set_code() and a return would
        # send an empty message first).
        context.abort(CODES[code], values.get("message", "failed with status %d" % code))
    return b""


@rpc("ServerStream", streaming_reply=True)
def server_stream(request, context):
    values = directives(request)
    for i in range(int(values.get("count", "1"))):
        yield b"reply %d" % i
    set_status(context, values)


@rpc("ClientStream")
def client_stream(requests, context):
    messages = 0
    size = 0
    for request in requests:
        messages += 1
        size += len(request)
    return json.dumps({"messages": messages, "bytes": size}).encode()


@rpc("BidiStream", streaming_reply=True)
def bidi_stream(requests, context):
    for request in requests:
        yield request


HANDLERS = {
    "Unary": grpc.unary_unary_rpc_method_handler(unary),
    "Fail": grpc.unary_unary_rpc_method_handler(fail),
    "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
    "ClientStream": grpc.stream_unary_rpc_method_handler(client_stream),
    "BidiStream": grpc.stream_stream_rpc_method_handler(bidi_stream),
}

server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), options=[("grpc.so_reuseport", 0)])
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("demo.Echo", HANDLERS),))
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print("READY", port, flush=True)
server.wait_for_termination()
