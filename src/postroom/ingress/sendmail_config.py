"""Which configuration ``postroom-sendmail -C FILE`` may load.

The command line is not always the caller's own: PHP's mail() appends its fifth argument to
``sendmail_path``, and an application that passes user input there lets an attacker add
``-C /var/www/uploads/evil.toml``. A configuration decides where files are written (the
store, the dead.letter file) and which files are read (``password_file``), so argv must not
choose an arbitrary one. The rule follows Postfix's sendmail(1) ``-C`` with
``alternate_config_directories`` (postconf(5)): ``-C FILE`` is honoured when

1. FILE is the default configuration (the one found without ``-C``): naming it changes
   nothing;
2. the real user is root (Postfix: the super-user may name any);
3. FILE's folder (symlinks resolved) is listed in the default configuration's
   ``[sendmail] alternate_config_directories``;
4. FILE belongs to the real user, no one else may write it, and the default configuration
   exists and belongs to that user too. Whoever may edit the default configuration could
   list FILE's folder there anyway, so this grants nothing new; it spares a developer who
   runs Postroom as themselves the listing. It is not granted without a default
   configuration: www-data owns what a web application saves (uploads), and with nothing
   to delegate from, its own files would be as good as any.

Otherwise the command exits 78 (EX_CONFIG), saying so. ``POSTROOM_CONFIG`` is not checked:
the environment is set by whoever started the command (the web server's configuration, a
crontab, a shell), which mail()'s argument cannot reach. It names the default configuration.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

from postroom.exceptions import ConfigError


def config_file(value: str) -> Path:
    """-C takes the file or, as Postfix's -C, the folder that holds it."""
    return Path(os.path.join(value, "postroom.toml") if os.path.isdir(value) else value)


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def trusted_config(value: str, environ: Mapping[str, str], uid: int) -> Path:
    """The file ``-C value`` names, if the rule above lets user ``uid`` load it, with
    symlinks resolved (what was checked is what gets read); else ConfigError."""
    from postroom import config_values
    from postroom.ingress import sendmail_settings

    named = config_file(value)
    real = Path(os.path.realpath(named))
    default = config_values.config_path_from(None, environ)
    try:
        has_default = default.is_file()
    except OSError:  # e.g. a HOME this user may not enter: nothing to delegate from
        has_default = False
    if uid == 0 or (has_default and _same(real, default)):
        return real
    try:
        st = os.stat(real)
    except OSError:
        return real  # missing or unreachable: loading it says which, in the usual words
    if has_default:
        listed = sendmail_settings.load(default, environ).sendmail.alternate_config_directories
        if any(_same(real.parent, Path(folder)) for folder in listed):
            return real
        own = (st.st_uid == uid and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
               and os.stat(default).st_uid == uid)
        if own:
            return real
    where = f"the default configuration {default}" if has_default else \
        "a default configuration (there is none)"
    raise ConfigError(
        f"-C {value}: not allowed for user id {uid}: besides root, a user may name only "
        f"{where}, a file in a folder listed in its [sendmail] alternate_config_directories, "
        "or, when the default configuration is theirs, a file of their own no one else can "
        f"write; to use {named}, list {real.parent} in alternate_config_directories, or set "
        f"POSTROOM_CONFIG={named} in the command's environment instead of -C (e.g. PHP's "
        f"sendmail_path = \"POSTROOM_CONFIG={named} postroom-sendmail -t -i\")",
        code="config.sendmail.untrusted")
