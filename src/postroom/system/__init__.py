"""Postroom as a system service: the systemd units (unit), their installation with the
service user and the standard layout (install), the system's sendmail (alternatives), the
readiness and watchdog messages to systemd (notify), and the dry-run-aware list of actions
the two install commands share (steps).
"""
