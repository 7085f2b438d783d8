"""The queue: durable rows (sql.py), retry timing (backoff.py), delivery (worker.py)."""
