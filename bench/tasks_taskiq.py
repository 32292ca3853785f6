"""The Taskiq side of the broker suite: coroutine tasks, results in Redis.

On Redis the broker is taskiq-redis' ``ListQueueBroker`` (a list, ``BRPOP``, no acks): its
``RedisStreamBroker`` (a stream with acks, like celeriac's) keeps fetching after a SIGTERM in
taskiq-redis 1.2.4, so its worker never stops by itself. On RabbitMQ taskiq-aio-pika's
``AioPikaBroker`` with its default queue type (quorum). Results go to taskiq-redis'
``RedisAsyncResultBackend`` at ``BENCH_BACKEND``. The worker loads this module with
``taskiq worker tasks_taskiq:broker``.
"""

import asyncio
import os

from marks import first_start
from taskiq_redis import RedisAsyncResultBackend

BROKER = os.environ["BENCH_BROKER"]
QUEUE = os.environ["BENCH_QUEUE"]

if BROKER.startswith("amqp"):
    from taskiq_aio_pika import AioPikaBroker
    from taskiq_aio_pika.exchange import Exchange
    from taskiq_aio_pika.queue import Queue

    broker = AioPikaBroker(BROKER, exchange=Exchange(name=QUEUE),
                           task_queues=[Queue(name=QUEUE)],
                           dead_letter_queue=Queue(name=f"{QUEUE}.dead_letter"))
else:
    from taskiq_redis import ListQueueBroker

    broker = ListQueueBroker(BROKER, queue_name=QUEUE)

broker = broker.with_result_backend(RedisAsyncResultBackend(os.environ["BENCH_BACKEND"]))


@broker.task
async def noop():
    return None


@broker.task
async def sleep():
    first_start()
    await asyncio.sleep(0.01)
