"""The queue: its operations on one database (sql.py's Queue), the group commit its writes go
through (commit.py), leases (lease.py), results (finish.py), the worker registry
(workers.py), retry timing (backoff.py), delivery (worker.py)."""
