"""CoSine's Celery configuration: broker and results on Redis under ``cosine-celery:``, json only, late acks.

Loaded by :mod:`cosine.batch.celery_app` (``COSINE_CELERY_CONFIG`` names another module to load instead).
Environment variables override where things are:

* ``COSINE_CELERY_BROKER_URL`` (default ``redis://127.0.0.1:6379/0``) and ``COSINE_CELERY_RESULT_BACKEND``
  (default: the broker URL): Celery's own Redis, as the ``cosine-celery`` ACL user
  (``redis://cosine-celery:PASSWORD@host:6379/0``), which may only touch ``cosine-celery:*`` keys and channels.
* ``COSINE_REDIS_URL``, ``COSINE_PREFIX``, ``COSINE_REDIS_USERNAME``, ``COSINE_REDIS_PASSWORD``: the CoSine
  deployment the ``generate`` and ``batch`` tasks submit to (as the ``cosine-producer`` user).
* ``COSINE_MAINTENANCE_REDIS_URL`` (+ ``_USERNAME``, ``_PASSWORD``): where the maintenance tasks connect, as
  the ``cosine-maintenance`` user (default: the deployment's URL and credentials).
"""

import os
from datetime import timedelta

from cosine import defaults

KEY_PREFIX = "cosine-celery:"  # every broker and result key and channel: what the cosine-celery ACL user may touch

broker_url = os.environ.get("COSINE_CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
result_backend = os.environ.get("COSINE_CELERY_RESULT_BACKEND", broker_url)

# A task taken from the Redis broker and not acked within the visibility timeout is handed to another worker.
# With late acks a task is acked when it ends, and a batch over a large file can run for hours: the default
# (1 h) would start a second copy of a batch still running. 12 h bounds how long one batch task may run; a
# task lost with its worker is redelivered after that long (split larger files into several batches).
VISIBILITY_TIMEOUT_S = 12 * 3600
# Remote control (`celery inspect`, revoke, Flower) reaches workers by PSUBSCRIBE to a fixed channel,
# cosine-celery:celery.pidbox: Redis grants a PSUBSCRIBE only for a pattern the user's ACL names literally, so
# the channel must not carry the database number kombu adds by default ("/0.").
broker_transport_options = {"global_keyprefix": KEY_PREFIX, "visibility_timeout": VISIBILITY_TIMEOUT_S,
                            "fanout_prefix": False}
result_backend_transport_options = {"global_keyprefix": KEY_PREFIX}
broker_connection_retry_on_startup = True

# json only: no pickle anywhere (a message is data, never code to run).
task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# Ack after the task ran (a worker lost mid-task leaves it to be redelivered), one task at a time per process.
task_acks_late = True
worker_prefetch_multiplier = 1
task_track_started = True  # `cosine batch status` tells queued from started
result_expires = timedelta(days=7)  # batch status stays readable for a week

task_default_queue = "cosine-batch"
# Maintenance touches the deployment's own keys: a worker of its own serves it, under the cosine-maintenance user.
task_routes = {"cosine.maintenance.*": {"queue": "cosine-maintenance"}}

beat_schedule = {
    "dead-letter-report": {"task": "cosine.maintenance.dead_letter_report", "schedule": timedelta(minutes=15)},
    "stale-consumers": {"task": "cosine.maintenance.stale_consumers", "schedule": timedelta(minutes=5),
                        "kwargs": {"idle_s": defaults.WORKER_FORGET_AFTER_S}},
    "orphan-streams": {"task": "cosine.maintenance.orphan_streams", "schedule": timedelta(minutes=15)},
}

# The CoSine deployment the tasks talk to (custom settings, read by cosine.batch.tasks).
cosine_redis_url = os.environ.get("COSINE_REDIS_URL", defaults.REDIS_URL)
cosine_prefix = os.environ.get("COSINE_PREFIX", defaults.KEY_PREFIX)
cosine_redis_username = os.environ.get("COSINE_REDIS_USERNAME")
cosine_redis_password = os.environ.get("COSINE_REDIS_PASSWORD")
# Maintenance: its own URL and credentials, or else the deployment's.
_own = "COSINE_MAINTENANCE_REDIS_URL" in os.environ
cosine_maintenance_redis_url = os.environ.get("COSINE_MAINTENANCE_REDIS_URL", cosine_redis_url)
cosine_maintenance_redis_username = os.environ.get("COSINE_MAINTENANCE_REDIS_USERNAME",
                                                   None if _own else cosine_redis_username)
cosine_maintenance_redis_password = os.environ.get("COSINE_MAINTENANCE_REDIS_PASSWORD",
                                                   None if _own else cosine_redis_password)
