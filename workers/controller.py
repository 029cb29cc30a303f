"""Controller process: watch the queues and publish speculation bounds and batch limits until SIGTERM."""

from __future__ import annotations

from cosine.broker import RedisSettings
from cosine.service.controller_service import ControllerService, ControllerSettings
from cosine.service.run_loop import stop_on_signals


def main(redis_settings: RedisSettings, settings: ControllerSettings) -> None:
    stop = stop_on_signals()
    ControllerService(redis_settings, settings).run(stop)
