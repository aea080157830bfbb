"""A gRPC server with raw-bytes methods: Echo (unary), Count (server streaming), Fail (error status)."""
import sys, time
from concurrent import futures
import grpc

def echo(request, context):
    context.set_trailing_metadata((('x-echo-trailer', 'done'),))
    return b'echo:' + request

def count(request, context):
    for i in range(int(request.decode() or '3')):
        yield f'item-{i}'.encode()

def fail(request, context):
    # Aborting before any message: a trailers-only response.
    context.abort(grpc.StatusCode.NOT_FOUND, 'no such thing')

def stream_fail(request, context):
    yield b'first'
    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, 'stop now')

def slow(request, context):
    for i in range(50):
        yield f'slow-{i}'.encode()
        time.sleep(0.05)

handlers = {
    'Slow': grpc.unary_stream_rpc_method_handler(slow),
    'Echo': grpc.unary_unary_rpc_method_handler(echo),
    'Count': grpc.unary_stream_rpc_method_handler(count),
    'Fail': grpc.unary_unary_rpc_method_handler(fail),
    'StreamFail': grpc.unary_stream_rpc_method_handler(stream_fail),
}
server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=(('grpc.max_metadata_size', 1 << 20),))
server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler('zt.Demo', handlers),))
server.add_insecure_port('127.0.0.1:' + sys.argv[1])
server.start()
time.sleep(float(sys.argv[2]) if len(sys.argv) > 2 else 60)
server.stop(0)
