"""The Celery worker: claims a job, runs the trainer, reports its progress, stores its adapter."""
