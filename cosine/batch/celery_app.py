"""The Celery app: ``celery -A cosine.batch.celery_app worker`` runs its tasks (:mod:`cosine.batch.tasks`),
``celery -A cosine.batch.celery_app beat`` schedules the maintenance ones. Configuration in
:mod:`cosine.batch.celeryconfig`."""

from __future__ import annotations

import os

from celery import Celery

CONFIG_MODULE = "cosine.batch.celeryconfig"


def create_app(**overrides) -> Celery:
    """A Celery app with CoSine's configuration (or the module named by ``COSINE_CELERY_CONFIG``), then
    ``overrides`` (setting names as in the config module)."""
    app = Celery("cosine", include=["cosine.batch.tasks"])
    app.config_from_object(os.environ.get("COSINE_CELERY_CONFIG", CONFIG_MODULE))
    if overrides:
        app.conf.update(overrides)
    return app


app = create_app()
