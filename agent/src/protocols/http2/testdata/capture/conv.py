"""Turn `strace -ff -ttt -T -yy -xx` output into per-connection syscall records of TCP port PORT.

Record: direction u8 (0 = the traced process sent, 1 = received), start_ns u64, end_ns u64, len u32, bytes (BE).
"""
import glob, re, struct, sys

port = ':' + sys.argv[2]
outdir, prefix = sys.argv[3], sys.argv[4]
SEND = {'sendmsg', 'sendto', 'write', 'writev', 'send'}
RECV = {'recvmsg', 'recvfrom', 'read', 'readv', 'recv'}
line_re = re.compile(r"^(\d+\.\d+) (\w+)\((\d+)<TCP(?:v6)?:\[(.+?)->(.+?)\]>, (.*) = (-?\d+).*<([\d.]+)>$")
str_re = re.compile(r'"((?:\\x[0-9a-f]{2})*)"')
conns = {}
for path in sorted(glob.glob(sys.argv[1] + '*')):
    for line in open(path):
        m = line_re.match(line.rstrip('\n'))
        if not m:
            continue
        ts, call, fd, local, remote, args, ret, dur = m.groups()
        ret = int(ret)
        if ret <= 0 or not (remote.endswith(port) or local.endswith(port)):
            continue
        if call in SEND: d = 0
        elif call in RECV: d = 1
        else: continue
        data = b''.join(bytes.fromhex(s.replace('\\x', '')) for s in str_re.findall(args))[:ret]
        assert len(data) == ret, (line[:200], len(data), ret)
        start = int(float(ts) * 1e9); end = start + int(float(dur) * 1e9)
        conns.setdefault((local, remote), []).append((start, end, d, data))
for i, (key, recs) in enumerate(sorted(conns.items(), key=lambda kv: kv[1][0][0])):
    recs.sort(key=lambda r: r[0])
    t0 = recs[0][0]
    out = b''.join(struct.pack('>BQQI', d, s - t0, e - t0, len(b)) + b for s, e, d, b in recs)
    name = f'{outdir}/{prefix}.{i}.bin'
    open(name, 'wb').write(out)
    print(name, key, len(recs), sum(len(r[3]) for r in recs))
