"""Side-by-side performance runs of durable_celery and plain Celery (not tests).

Run ``python -m benchmarks.run --help``; see benchmarks/README.md.
"""
