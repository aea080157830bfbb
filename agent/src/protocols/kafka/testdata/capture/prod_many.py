import sys
from confluent_kafka import Producer, Consumer, TopicPartition
boot = open('/tmp/kcap/bootstrap').read()
topic, comp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
if sys.argv[4] == 'produce':
    p = Producer({'bootstrap.servers': boot, 'compression.type': comp, 'linger.ms': 200, 'client.id': 'zt-many',
                  'enable.idempotence': False, 'enable.metrics.push': False})
    for i in range(n):
        hdrs = [('a', b'1'), ('traceparent', f'00-{i:032x}-{i:016x}-01'.encode())] if i % 3 else None
        p.produce(topic, value=f'v{i}'.encode() * 20, headers=hdrs, partition=0)
    p.flush(10)
else:
    c = Consumer({'bootstrap.servers': boot, 'group.id': 'unused', 'client.id': 'zt-many-c', 'enable.metrics.push': False,
                  'enable.auto.commit': False})
    c.assign([TopicPartition(topic, 0, 0)])
    got = 0
    while got < n:
        m = c.poll(10)
        if m is None: break
        got += 1
    print('got', got)
    c.close()
