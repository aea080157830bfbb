"""Calls the demo server on one channel: Echo, Count(3), Fail, StreamFail, Echo, Echo with 20000 bytes of
metadata, then Slow cancelled after two messages."""
import sys
import grpc

channel = grpc.insecure_channel('127.0.0.1:' + sys.argv[1], options=(('grpc.max_metadata_size', 1 << 20),))
echo = channel.unary_unary('/zt.Demo/Echo')
count = channel.unary_stream('/zt.Demo/Count')
fail = channel.unary_unary('/zt.Demo/Fail')
stream_fail = channel.unary_stream('/zt.Demo/StreamFail')
print(echo(b'hello', metadata=(('traceparent', '00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'),)))
print(list(count(b'3')))
try:
    fail(b'x')
except grpc.RpcError as e:
    print(e.code(), e.details())
try:
    print(list(stream_fail(b'y')))
except grpc.RpcError as e:
    print(e.code(), e.details())
print(echo(b'again'))
# A header block bigger than a frame: HEADERS then CONTINUATION.
print(echo(b'big', metadata=(('x-big', 'v' * 20000),)))
# Cancelled after two items: the client resets the stream (CANCEL).
slow = channel.unary_stream('/zt.Demo/Slow')(b'')
print(next(slow), next(slow))
slow.cancel()
import time; time.sleep(0.2)
channel.close()
