"""The Dramatiq side of the broker suite: the same tasks, results in Redis.

Results go through Dramatiq's ``Results`` middleware to a ``RedisBackend`` at
``BENCH_BACKEND`` (actors declare ``store_results=True``), on either broker. The worker loads
it with ``dramatiq tasks_dramatiq``.
"""

import os
import time

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend
from marks import first_start

BROKER = os.environ["BENCH_BROKER"]
QUEUE = os.environ["BENCH_QUEUE"]

if BROKER.startswith("amqp"):
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker = RabbitmqBroker(url=BROKER)
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=BROKER)

backend = RedisBackend(url=os.environ["BENCH_BACKEND"])
broker.add_middleware(Results(backend=backend))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, store_results=True)
def noop():
    return None


@dramatiq.actor(queue_name=QUEUE, store_results=True)
def sleep():
    first_start()
    time.sleep(0.01)
