import sys, time
from confluent_kafka import Producer
p = Producer({'test.mock.num.brokers': 1})
md = p.list_topics(timeout=10)
b = list(md.brokers.values())[0]
print(f"{b.host}:{b.port}", flush=True)
with open('/tmp/kcap/bootstrap', 'w') as f:
    f.write(f"{b.host}:{b.port}")
while True:
    time.sleep(1)
