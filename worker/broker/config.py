"""The worker's Celery configuration, read from the environment: the package's own, never shadowed.

Every value that matters for delivery guarantees is here, with the reason. The app
(:mod:`worker.broker.app`) loads it by its full name, so an application's own ``celeryconfig.py`` on
``sys.path`` cannot replace it; a deployment that must change a Celery setting names its module in
``CELERY_CONFIG_MODULE`` (the repository's top-level ``celeryconfig.py`` is the example), applied on top.

Example::

    >>> from worker.broker import config
    >>> config.task_acks_late, config.task_reject_on_worker_lost
    (True, True)
"""

from kombu import Queue

from ..redisconf import MAX_CONNECTIONS
from ..settings import get_settings
from ..vendors import VENDORS

_s = get_settings()

# REDIS_URL, read by worker/redisconf.py: one Redis (redis://, rediss://) or the master that Sentinels
# (sentinel://h1,h2,h3/0 + REDIS_SENTINEL_MASTER) monitor, found again after a failover.
_broker = _s.redis_target().celery()
broker_url = _broker["broker_url"]
# kombu's Redis transport (or its Sentinel flavour), made to take each message atomically and to
# dead-letter undecodable messages instead of dying on them (worker/broker/transport.py).
broker_transport = _broker["broker_transport"]
# TLS options of a rediss:// or sentinels:// URL; Flower's broker view reads them from here too.
broker_use_ssl = _broker["broker_use_ssl"] or False
broker_transport_options = {
    # A message a worker holds (while it delivers it) is handed to another worker
    # after this long: the longest one delivery takes, plus a margin (35 s by
    # default). Retries wait in Redis (worker/retries/schedule.py), never in a
    # worker, so nothing is held for longer.
    "visibility_timeout": _s.visibility_timeout,
    # ...and it is looked for often: kombu's default scans only every ~100 s
    # (10 s interval x throttle 10), so a dead worker's messages would sit idle.
    "unacked_restore_interval": min(5.0, _s.visibility_timeout / 4),
    "unacked_restore_throttle": 1,
    # A worker killed while it holds the restore lock blocks every restore until
    # the lock expires: kombu's default is 300 s. A scan takes milliseconds.
    "unacked_mutex_expire": 15,
    # A web handler must not hang on a dead broker: connect fast or fail.
    "socket_connect_timeout": _s.publish_timeout,
    "socket_timeout": 10,
    "retry_on_timeout": False,
    "health_check_interval": 30,
    # kombu's pool of Redis connections (acks, restores, task events) opens as many as run at once, as the
    # product's own clients do: kombu's default cap (10) fails the command past it ("Too many connections"),
    # and a green pool runs hundreds of tasks at once.
    "max_connections": MAX_CONNECTIONS,
    # Under Sentinel: the master's name, and how to reach the Sentinels (password, TLS, timeouts).
    **_broker["transport_options"],
}
broker_connection_retry_on_startup = True
broker_connection_timeout = _s.publish_timeout
broker_pool_limit = 16

# One queue per vendor: a slow or throttled vendor never blocks the others,
# and operators may run `celery -A worker worker -Q loops` for one vendor.
task_queues = [Queue(name, routing_key=name) for name in VENDORS]
task_default_queue = next(iter(VENDORS))
task_create_missing_queues = False

# Publishing from a web handler: one quick retry, then EnqueueError.
task_publish_retry = True
task_publish_retry_policy = {"max_retries": 1, "interval_start": 0, "interval_step": 0.05, "interval_max": 0.05}

task_serializer = "json"
accept_content = ["json"]
task_ignore_result = True
result_backend = None
# One result backend object for the whole process. Celery makes one per thread unless the backend is declared
# thread-safe, and on the gevent pool every task runs in a new greenlet, its own "thread": a backend was built
# for every delivery (7-9 % of a gevent worker's CPU). The disabled backend holds nothing; a deployment that sets
# a result backend of its own gets Celery's default back (worker/broker/app.py).
result_backend_thread_safe = True

# At-least-once: acknowledge after the delivery finished (or was dead-lettered),
# and give the message back if the worker dies under it.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1

# Delivery is I/O-bound: many threads, one pooled HTTP client per process.
worker_pool = "threads"
worker_concurrency = _s.worker_concurrency

# Flower: task events on. Producers publish without Celery ("sent" events would cost every web call a round trip).
worker_send_task_events = True
task_send_sent_event = False
worker_hijack_root_logger = True
worker_redirect_stdouts = True
worker_cancel_long_running_tasks_on_connection_loss = False

# The one task module: a worker imports it at start (the producer never does).
imports = ("worker.broker.tasks",)
