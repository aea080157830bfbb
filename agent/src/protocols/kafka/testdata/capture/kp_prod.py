import sys, ast
from kafka import KafkaProducer
boot = open('/tmp/kcap/bootstrap').read()
topic, comp = sys.argv[1], sys.argv[2]
kw = {'api_version': ast.literal_eval(sys.argv[3])} if len(sys.argv) > 3 else {}
p = KafkaProducer(bootstrap_servers=boot, client_id='kp-producer', compression_type=None if comp == 'none' else comp,
                  linger_ms=100, acks='all', **kw)
for i in range(4):
    hdrs = [('traceparent', f'00-{i + 0xa1:032x}-{i + 0xb1:016x}-01'.encode())]
    p.send(topic, key=f'k{i}'.encode(), value=f'kp-value-{i}'.encode(), headers=hdrs if 'nohdr' not in sys.argv else None, partition=i % 2)
p.flush(10)
p.close()
