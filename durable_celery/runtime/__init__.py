"""What happens inside one Celery task: claim, run, commit, run-ahead."""
