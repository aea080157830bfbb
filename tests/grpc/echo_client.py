"""A grpcio client of demo.Echo, raw bytes (no generated code), all calls on ONE channel, so on
one HTTP/2 connection.

    python3 echo_client.py '<spec JSON>'

Spec: {"target": "127.0.0.1:<port>", "concurrent": bool, "calls": [{"service", "method",
"kind": "unary" | "server_stream" | "client_stream" | "bidi", "messages": [{"text": str} |
{"size": n}], "metadata": [[key, value], ...], "timeout_ms": n | null}]}. A `size` message is
n bytes of "abc...zabc...". Concurrent calls wait at a barrier and then run at once, as
multiplexed streams. A bidi call sends each request after the echo of the one before.

Prints one JSON line per call, when it ends: {"call": index, "code", "details", "replies",
"reply_bytes", "echoed": replies == requests (concatenated), "first_reply": text of a short
first reply or null, "echo_traceparent": that trailing metadata, "elapsed_ms"}. A non-OK status
is a result, not a failure of the client.
"""

import json
import queue
import sys
import threading
import time

import grpc

spec = json.loads(sys.argv[1])
print_lock = threading.Lock()


def payload(message):
    if "text" in message and message["text"] is not None:
        return message["text"].encode()
    size = message["size"]
    pattern = bytes(range(ord("a"), ord("z") + 1))
    return (pattern * (size // 26 + 1))[:size]


def bidi_requests(requests, replies_seen):
    """Yields request i+1 only once the echo of request i arrived."""
    for i, request in enumerate(requests):
        if i > 0 and replies_seen.get() is None:
            return
        yield request


def run(channel, index, call):
    path = "/%s/%s" % (call["service"], call["method"])
    metadata = [tuple(pair) for pair in call.get("metadata") or []]
    timeout = call["timeout_ms"] / 1000 if call.get("timeout_ms") is not None else None
    requests = [payload(m) for m in call["messages"]]
    kind = call["kind"]
    replies = []
    rpc = None
    start = time.monotonic()
    try:
        if kind == "unary":
            reply, rpc = channel.unary_unary(path).with_call(requests[0], metadata=metadata, timeout=timeout)
            replies.append(reply)
        elif kind == "client_stream":
            reply, rpc = channel.stream_unary(path).with_call(iter(requests), metadata=metadata, timeout=timeout)
            replies.append(reply)
        elif kind == "server_stream":
            rpc = channel.unary_stream(path)(requests[0], metadata=metadata, timeout=timeout)
            for reply in rpc:
                replies.append(reply)
        elif kind == "bidi":
            seen = queue.Queue()
            rpc = channel.stream_stream(path)(bidi_requests(requests, seen), metadata=metadata, timeout=timeout)
            try:
                for reply in rpc:
                    replies.append(reply)
                    seen.put(True)
            finally:
                seen.put(None)
        else:
            sys.exit("unknown call kind %r" % kind)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        rpc = error
        code, details = error.code(), error.details() or ""
    elapsed_ms = (time.monotonic() - start) * 1000
    trailing = (rpc.trailing_metadata() or ()) if rpc is not None else ()
    received = b"".join(replies)
    first = None
    if replies and len(replies[0]) < 1024:
        try:
            first = replies[0].decode()
        except UnicodeDecodeError:
            pass
    result = {
        "call": index,
        "code": code.value[0],
        "details": details,
        "replies": len(replies),
        "reply_bytes": len(received),
        "echoed": received == b"".join(requests),
        "first_reply": first,
        "echo_traceparent": [value for key, value in trailing if key == "echo-traceparent"],
        "elapsed_ms": round(elapsed_ms, 3),
    }
    with print_lock:
        print(json.dumps(result), flush=True)


def main():
    calls = spec["calls"]
    with grpc.insecure_channel(spec["target"], options=[("grpc.enable_http_proxy", 0)]) as channel:
        if not spec.get("concurrent"):
            for index, call in enumerate(calls):
                run(channel, index, call)
            return
        barrier = threading.Barrier(len(calls))

        def concurrent(index, call):
            barrier.wait()
            run(channel, index, call)

        threads = [threading.Thread(target=concurrent, args=(i, c)) for i, c in enumerate(calls)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()


main()
