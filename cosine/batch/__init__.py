"""Request-level and offline work on Celery, off the per-step hot path: one generation as a task, batch jobs
over JSONL files, and the periodic maintenance of a deployment's streams (see docs/batch.md)."""
