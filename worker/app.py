"""The Celery application (filled in by the pipeline)."""

from celery import Celery

app = Celery("cacheship")
