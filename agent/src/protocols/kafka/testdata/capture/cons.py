import sys
from confluent_kafka import Consumer
boot = open('/tmp/kcap/bootstrap').read()
topics, group, n = sys.argv[1].split(","), sys.argv[2], int(sys.argv[3])
c = Consumer({'bootstrap.servers': boot, 'group.id': group, 'auto.offset.reset': 'earliest', 'client.id': 'zt-consumer',
              'enable.auto.commit': False, 'enable.metrics.push': False})
c.subscribe(topics)
got = 0
while got < n:
    m = c.poll(10)
    if m is None: break
    if m.error(): print(m.error()); continue
    got += 1
    print(m.partition(), m.offset(), m.headers())
c.commit(asynchronous=False)
c.close()
