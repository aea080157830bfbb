import sys, ast
from kafka import KafkaConsumer
boot = open('/tmp/kcap/bootstrap').read()
topics, n = sys.argv[1].split(','), int(sys.argv[2])
kw = {'api_version': ast.literal_eval(sys.argv[3])} if len(sys.argv) > 3 else {}
c = KafkaConsumer(*topics, bootstrap_servers=boot, group_id='kp-group', client_id='kp-consumer', auto_offset_reset='earliest',
                  enable_auto_commit=False, consumer_timeout_ms=8000, **kw)
got = 0
for m in c:
    print(m.topic, m.partition, m.offset, m.headers); got += 1
    if got >= n: break
c.commit()
c.close()
