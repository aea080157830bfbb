import sys
from confluent_kafka import Producer
boot = open('/tmp/kcap/bootstrap').read()
comp, acks, topic = sys.argv[1], sys.argv[2], sys.argv[3]
p = Producer({'bootstrap.servers': boot, 'compression.type': comp, 'acks': acks, 'linger.ms': 100,
              'client.id': 'zt-producer', 'enable.idempotence': False, 'enable.metrics.push': False})
for i in range(6):
    hdrs = [('traceparent', f'00-{i + 1:032x}-{i + 1:016x}-01'.encode())] if i != 2 else [('other', b'x')]
    p.produce(topic, key=f'k{i}', value=f'value-{i}-' + 'abc' * 40, headers=hdrs, partition=i % 2)
p.flush(10)
