import sys, ast
from kafka import KafkaConsumer, TopicPartition
boot = open('/tmp/kcap/bootstrap').read()
topics, n = sys.argv[1].split(','), int(sys.argv[2])
kw = {'api_version': ast.literal_eval(sys.argv[3])} if len(sys.argv) > 3 else {}
c = KafkaConsumer(bootstrap_servers=boot, group_id=None, client_id='kp-fetcher', auto_offset_reset='earliest',
                  consumer_timeout_ms=5000, **kw)
c.assign([TopicPartition(t, p) for t in topics for p in (0, 1)])
got = 0
for m in c:
    print(m.topic, m.partition, m.offset, m.headers); got += 1
    if got >= n: break
c.close()
