"""Prints the HTTP/2 frames of a capture, both directions (hpack-decoded when the hpack module is present)."""
import struct, sys
try:
    import hpack
except ImportError:
    hpack = None
PREFACE = b'PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n'
NAMES = {0:'DATA',1:'HEADERS',2:'PRIORITY',3:'RST_STREAM',4:'SETTINGS',5:'PUSH_PROMISE',6:'PING',7:'GOAWAY',8:'WINDOW_UPDATE',9:'CONTINUATION'}
data = open(sys.argv[1], 'rb').read()
client_sent = sys.argv[2] == 'client' if len(sys.argv) > 2 else True
streams = {0: b'', 1: b''}
i = 0
while i < len(data):
    d, s, e, n = struct.unpack('>BQQI', data[i:i+21]); streams[d] += data[i+21:i+21+n]; i += 21 + n
dec = {0: hpack.Decoder() if hpack else None, 1: hpack.Decoder() if hpack else None}
for d in (0, 1):
    b = streams[d]
    is_c2s = (d == 0) == client_sent
    print('=== direction', d, 'client->server' if is_c2s else 'server->client', len(b))
    p = 0
    if is_c2s:
        assert b.startswith(PREFACE); p = len(PREFACE)
    block = b''
    while p + 9 <= len(b):
        ln = int.from_bytes(b[p:p+3], 'big'); t = b[p+3]; f = b[p+4]; sid = int.from_bytes(b[p+5:p+9], 'big') & 0x7fffffff
        pl = b[p+9:p+9+ln]
        extra = ''
        if t in (1, 9, 5):
            frag = pl
            if t == 1:
                pad = frag[0] if f & 8 else 0
                frag = frag[(1 if f & 8 else 0) + (5 if f & 0x20 else 0):len(frag)-pad]
            if t == 5:
                frag = frag[4:]
            block += frag
            if f & 4:
                if dec[d]:
                    hs = dec[d].decode(block, raw=True)
                    extra = ' ' + repr([(k.decode(), v.decode()[:60]) for k, v in hs])
                block = b''
        elif t in (3, 7, 6, 8, 4):
            extra = ' ' + pl[:40].hex()
        print(f'{NAMES.get(t, t)} len={ln} flags={f:#x} stream={sid}{extra}')
        p += 9 + ln
    if p != len(b): print('trailing', len(b) - p)
