"""The database: tables (schema.py), engine set-up and migrations (db.py)."""
