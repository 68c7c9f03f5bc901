"""The worker's Celery app: `celery -A worker.celery_app worker --concurrency 1`."""

from __future__ import annotations

import logging

from celery.signals import after_setup_logger

import worker.shutdown  # noqa: F401  (connects the graceful-shutdown signal handlers)
from service.queue import make_celery
from service.settings import get_settings

app = make_celery(get_settings())
app.conf.include = ["worker.tasks"]


@after_setup_logger.connect
def _quiet_libraries(logger: logging.Logger, *_args, **_kwargs) -> None:
    for name in ("botocore", "urllib3", "httpx", "transformers"):
        logging.getLogger(name).setLevel(logging.WARNING)
