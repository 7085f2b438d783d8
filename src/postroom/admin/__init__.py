"""Who may administer this instance, and how they prove it.

- ``config``: the ``[admin]`` section of postroom.toml (``AdminSettings``).
- ``accounts``: admin accounts (argon2id passwords, roles, TOTP, lockout shared by nodes).
- ``sessions``: the web admin's server-side sessions and their CSRF tokens.
- ``tokens``: admin API tokens (``prt_<id>_<secret>``) for ``/api/v1/admin``.
- ``setup``: the one-time link that creates the first account.

Every change made here is written to the audit log (``postroom.audit``) in the same
transaction. The pages and endpoints themselves are in ``postroom.web``; the commands in
``postroom.commands.admin``.
"""
