"""`postroom-sendmail` under a hostile command line (issue 11, point 9).

The attack: a PHP application passes user input as mail()'s fifth argument, which PHP appends
to sendmail_path. With `-C FILE` the attacker chose the configuration (an "upload" the web
user saved), whose dead_letter pointed into the web root: a refused message became a PHP
file there. The web user is `nobody` (the tests run as root; setpriv drops to it), the web
root and the upload folder are nobody's, and the site's own configuration, root's, is named by
POSTROOM_CONFIG in the environment, as a web server's configuration would set it.

Each test checks the refusal (exit status, one clear line, nothing written in the web root,
the message kept where it is safe) and that a legitimate send by the same user still works:
handed over SMTP to a real `postroom serve`, whose store gets the row (one test follows the
message to the real Postfix + Dovecot upstream).
"""

from __future__ import annotations

import contextlib
import json
import mailbox
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, free_port, smtp_connection

pytestmark = [pytest.mark.peers]

RCPT = "testuser@example.test"
NOBODY = 65534
TIMEOUT = 20.0  # every subprocess and wait in this module
SENDMAIL = Path(sys.executable).parent / "postroom-sendmail"
AS_NOBODY = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--")
PAYLOAD = '<?php echo "pwned"; ?>'


@pytest.fixture(scope="module", autouse=True)
def _tools() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests run as root: they play the web user as nobody (setpriv)",
                    pytrace=False)
    for tool in ("php", "setpriv"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed: run `bash tests/peers/clients.sh install`",
                        pytrace=False)


@pytest.fixture(scope="module")
def pr(tmp_path_factory: pytest.TempPathFactory, peers: Any) -> Iterator[Postroom]:
    with Postroom(tmp_path_factory.mktemp("hostile-sendmail"),
                 connections=smtp_connection(peers.plain_port)) as p:
        yield p


@dataclass
class Site:
    """A web host: folders nobody (the web user) may enter, laid out as on a server."""

    root: Path
    web: Path  # the web root, nobody's, PHP's working folder
    uploads: Path  # where the application saves what users upload, nobody's
    home: Path  # nobody's HOME
    config: Path  # the site's configuration, root's, hand-off to `pr`
    evil: Path  # the attacker's configuration, saved by the application (nobody's)

    def web_files(self) -> list[str]:
        return sorted(p.name for p in self.web.iterdir())


def _handoff(port: int, extra: str = "", data_dir: str = "spool") -> str:
    return (f'[server]\ndata_dir = "{data_dir}"\nhostname = "web.example"\n'
            f'[sendmail]\nserver = "smtp://127.0.0.1:{port}"\ntimeout = 5\n{extra}')


@pytest.fixture
def site(pr: Postroom) -> Iterator[Site]:
    # pytest's tmp folders are 0700: nobody could not enter them.
    root = Path(tempfile.mkdtemp(prefix="postroom-hostile-sendmail-"))
    try:
        root.chmod(0o755)
        folders = [root / name for name in ("web", "uploads", "home", "etc")]
        for folder in folders:
            folder.mkdir(mode=0o755)
        for folder in folders[:3]:
            os.chown(folder, NOBODY, NOBODY)
        web, uploads, home, etc = folders
        config = etc / "postroom.toml"
        config.write_text(_handoff(pr.smtp_port))
        config.chmod(0o644)
        evil = uploads / "evil.toml"
        # Whatever it says, it must not be obeyed: the web root as data folder and store,
        # a server that is down (so the message would be kept) and dead_letter in the web root.
        evil.write_text(f'[server]\ndata_dir = "{web}"\ndatabase = "sqlite:///{web}/db.php"\n'
                        f'[sendmail]\nserver = "smtp://127.0.0.1:{free_port()}"\ntimeout = 5\n'
                        f'dead_letter = "{web}/shell.php"\n')
        os.chown(evil, NOBODY, NOBODY)
        evil.chmod(0o644)
        yield Site(root, web, uploads, home, config, evil)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _env(site: Site, **extra: str) -> dict[str, str]:
    """A web server's environment: what it sets, nothing of the test runner's."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(site.home),
           "LANG": "C.UTF-8"}
    env.update(extra)
    return env


def _run(args: list[str], env: dict[str, str], *, cwd: Path, input: bytes = b"",
         user: tuple[str, ...] = AS_NOBODY) -> subprocess.CompletedProcess[str]:
    out = subprocess.run([*user, *args], input=input, capture_output=True, timeout=TIMEOUT,
                         env=env, cwd=cwd)
    return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(),
                                       out.stderr.decode("utf-8", "replace"))


def _subject(tag: str) -> str:
    return f"hostile-sendmail {tag} {uuid.uuid4().hex}"


def _message(subject: str) -> bytes:
    return f"To: {RCPT}\nSubject: {subject}\n\n{PAYLOAD}\n".encode()


def _php_mail(site: Site, subject: str, fifth: str | None, *, sendmail_path: str,
              env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """PHP's own mail(), run by the web user in the web root; ``fifth`` is what an attacker
    put in its fifth argument (PHP passes it through escapeshellcmd and appends it)."""
    args = "" if fifth is None else ', "", $argv[2]'
    code = (f'$ok = mail("{RCPT}", $argv[1], \'{PAYLOAD}\'{args}); exit($ok ? 0 : 3);')
    return _run(["php", "-d", f"sendmail_path={sendmail_path}", "-r", code, "--", subject,
                 *([fifth] if fifth is not None else [])], env, cwd=site.web)


def _stored(db: Path, subject: str) -> dict[str, Any]:
    """The row `postroom serve` stored for ``subject`` (waits for it, bounded)."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True,
                                                timeout=10)) as c:
            c.row_factory = sqlite3.Row
            rows = [dict(r) for r in c.execute(
                "SELECT status, sender, recipients, source FROM messages WHERE subject = ?",
                (subject,))]
        if rows:
            assert len(rows) == 1, rows
            rows[0]["recipients"] = json.loads(rows[0]["recipients"])
            return rows[0]
        time.sleep(0.1)
    raise AssertionError(f"no stored row for {subject!r}")


def _one_line_each(r: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines and all(x.startswith("postroom-sendmail: ") for x in lines), r.stderr


def _kept(path: Path, subject: str, owner: int) -> mailbox.mboxMessage:
    """The dead.letter entry for ``subject``; the file is 0600 and ``owner``'s."""
    st = path.stat()
    assert st.st_mode & 0o777 == 0o600 and st.st_uid == owner, oct(st.st_mode)
    found = [m for m in mailbox.mbox(str(path)) if m["Subject"] == subject]
    assert len(found) == 1, [m["Subject"] for m in mailbox.mbox(str(path))]
    return found[0]


def _legitimate_send(pr: Postroom, site: Site, env: dict[str, str], *args: str,
                     user: tuple[str, ...] = AS_NOBODY) -> None:
    """The same user, without the attacker's argument, is served."""
    subject = _subject("legitimate")
    r = _run([str(SENDMAIL), "-t", "-i", *args], env, cwd=site.web, input=_message(subject),
             user=user)
    assert r.returncode == 0, r.stderr
    assert _stored(pr.db, subject)["source"] == "smtp:trusted"


def test_php_mail_injected_config_writes_nothing_in_the_web_root(
        pr: Postroom, peers: Any, site: Site) -> None:
    """The reproduced attack: mail(..., "-C/uploads/evil.toml") as the web user. The file is
    the web user's own, but the default configuration (the site's) is root's: refused, 78,
    one line naming the rule and the fix; nothing in the web root; the message kept in the
    web user's ~/dead.letter. Sendmail's own log-file trick (-X, CVE-2016-10033) is ignored."""
    env = _env(site, POSTROOM_CONFIG=str(site.config))
    path = f"{SENDMAIL} -t -i"
    subject = _subject("php-injected-C")
    r = _php_mail(site, subject, f"-C{site.evil}", sendmail_path=path, env=env)
    assert r.returncode == 3, r.stderr  # mail() returned false
    _one_line_each(r)
    assert f"-C {site.evil}: not allowed for user id {NOBODY}" in r.stderr
    assert "alternate_config_directories" in r.stderr and "POSTROOM_CONFIG=" in r.stderr
    assert "(config.sendmail.untrusted)" in r.stderr
    assert site.web_files() == []
    assert sorted(p.name for p in site.uploads.iterdir()) == ["evil.toml"]
    kept = _kept(site.home / "dead.letter", subject, NOBODY)
    assert "config.sendmail.untrusted" in kept["X-Postroom-Error"]

    subject = _subject("php-injected-X")
    r = _php_mail(site, subject, f"-OQueueDirectory=/tmp -X{site.web}/shell.php",
                  sendmail_path=path, env=env)
    assert r.returncode == 0, r.stderr  # accepted and ignored, as by Postfix
    assert site.web_files() == []
    assert _stored(pr.db, subject)["source"] == "smtp:trusted"

    subject = _subject("php-legitimate")
    r = _php_mail(site, subject, None, sendmail_path=path, env=env)
    assert r.returncode == 0, r.stderr
    found = peers.wait_for(RCPT, subject, timeout=TIMEOUT)
    assert PAYLOAD.encode() in found.raw
    assert site.web_files() == []


def test_allowed_folder_and_a_second_C(pr: Postroom, site: Site) -> None:
    """The site lists its folder in the default configuration's alternate_config_directories
    and names it in sendmail_path: mail() works. An attacker's -C appended after it is
    refused (64, before the message is read) instead of replacing it. A symlink in the listed
    folder leading out of it does not count as in it."""
    allowed = site.root / "site-a"
    allowed.mkdir(mode=0o755)
    (allowed / "postroom.toml").write_text(_handoff(pr.smtp_port))
    site.config.write_text(_handoff(pr.smtp_port, f'alternate_config_directories = '
                                                  f'["{allowed}"]\n'))
    env = _env(site, POSTROOM_CONFIG=str(site.config))
    path = f"{SENDMAIL} -t -i -C {allowed / 'postroom.toml'}"
    subject = _subject("php-allowed")
    r = _php_mail(site, subject, None, sendmail_path=path, env=env)
    assert r.returncode == 0, r.stderr
    assert _stored(pr.db, subject)["recipients"] == [RCPT]

    r = _php_mail(site, _subject("php-second-C"), f"-C{site.evil}", sendmail_path=path,
                  env=env)
    assert r.returncode == 3
    _one_line_each(r)
    assert "-C given twice" in r.stderr, r.stderr
    assert site.web_files() == [] and not (site.home / "dead.letter").exists()
    r = _run([str(SENDMAIL), "-C", str(allowed), "-C", str(site.evil), RCPT], env,
             cwd=site.web, input=b"Subject: x\n\nx\n")
    assert r.returncode == 64, r.stderr

    (allowed / "link.toml").symlink_to(site.evil)
    r = _run([str(SENDMAIL), "-C", str(allowed / "link.toml"), RCPT], env, cwd=site.web,
             input=_message(_subject("symlink")))
    assert r.returncode == 78 and "config.sendmail.untrusted" in r.stderr, r.stderr
    assert site.web_files() == []
    _legitimate_send(pr, site, env, "-C", str(allowed))  # -C FOLDER, as Postfix's -C


def test_no_default_configuration_no_own_file(pr: Postroom, site: Site) -> None:
    """Without a default configuration there is no one to delegate from: the web user's own
    file is refused too (it owns what the application saves)."""
    if Path("/etc/postroom/postroom.toml").exists():
        pytest.fail("/etc/postroom/postroom.toml exists on this machine: the test needs none")
    env = _env(site)  # no POSTROOM_CONFIG; HOME and the web root hold no postroom.toml
    subject = _subject("no-default")
    r = _run([str(SENDMAIL), "-t", "-C", str(site.evil)], env, cwd=site.web,
             input=_message(subject))
    assert r.returncode == 78, r.stderr
    _one_line_each(r)
    assert "a default configuration (there is none)" in r.stderr
    assert site.web_files() == []
    _kept(site.home / "dead.letter", subject, NOBODY)
    _legitimate_send(pr, site, _env(site, POSTROOM_CONFIG=str(site.config)))


def test_own_file_when_the_default_configuration_is_ones_own(pr: Postroom,
                                                            site: Site) -> None:
    """A user who runs Postroom as themselves (the default configuration is theirs) may name
    a file of their own, unless someone else may write it or it is someone else's."""
    default = site.home / "default.toml"
    mine = site.home / "mine.toml"
    for path in (default, mine):
        path.write_text(_handoff(pr.smtp_port))
        os.chown(path, NOBODY, NOBODY)
        path.chmod(0o600)
    env = _env(site, POSTROOM_CONFIG=str(default))
    _legitimate_send(pr, site, env, "-C", str(mine))
    for mode, owner in ((0o620, NOBODY), (0o602, NOBODY), (0o644, 0)):
        os.chown(mine, owner, owner)
        mine.chmod(mode)
        r = _run([str(SENDMAIL), "-C", str(mine), RCPT], env, cwd=site.web,
                 input=_message(_subject("not-own")))
        assert r.returncode == 78 and "config.sendmail.untrusted" in r.stderr, (mode, r.stderr)
    _legitimate_send(pr, site, env)


def test_root_may_name_any_configuration_but_dead_letter_stays_confined(
        pr: Postroom, site: Site) -> None:
    """Root may name any file (Postfix: the super-user), even the attacker's; its dead_letter
    in the web root is still refused (78) and the message kept in root's ~/dead.letter."""
    home = site.root / "root-home"
    home.mkdir(mode=0o700)
    env = _env(site, HOME=str(home))
    subject = _subject("root-evil")
    r = _run([str(SENDMAIL), "-C", str(site.evil), RCPT], env, cwd=site.web,
             input=_message(subject), user=())
    assert r.returncode == 78, r.stderr
    _one_line_each(r)
    assert "sendmail.dead_letter: the name 'shell.php'" in r.stderr
    assert site.web_files() == []
    _kept(home / "dead.letter", subject, 0)
    anywhere = site.root / "anywhere.toml"
    anywhere.write_text(_handoff(pr.smtp_port))
    anywhere.chmod(0o666)  # root is trusted to know what it names
    _legitimate_send(pr, site, env, "-C", str(anywhere), user=())


def test_dead_letter_is_confined(pr: Postroom, site: Site) -> None:
    """dead_letter must be a file inside the data folder (symlinks resolved), or ~/dead.letter,
    named without an extension a web server acts on; anything else is refused before the
    message is read into place, and the message is kept in ~/dead.letter instead."""
    config = site.home / "site.toml"
    data = site.home / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    (data / "link").symlink_to(site.web)
    down = free_port()
    env = _env(site, POSTROOM_CONFIG=str(config))
    refused = [f"{site.web}/dead.letter", "data/shell.php", "data/x.php.letter",
               "data/.htaccess", "data/link/dead.letter", "data/../../web/dead.letter",
               "data/dead.letter.phtml"]
    for value in refused:
        config.write_text(_handoff(down, f'dead_letter = "{value}"\n', data_dir="data"))
        subject = _subject("confined")
        r = _run([str(SENDMAIL), RCPT], env, cwd=site.web, input=_message(subject))
        assert r.returncode == 78, (value, r.stderr)
        _one_line_each(r)
        assert "(config.sendmail.dead_letter)" in r.stderr, r.stderr
        assert f"kept in {site.home / 'dead.letter'}" in r.stderr
        assert site.web_files() == [], value
        _kept(site.home / "dead.letter", subject, NOBODY)
    for value, where in (("data/dead.letter", data / "dead.letter"),
                         ("data/site.mbox", data / "site.mbox"),
                         (f"{site.home}/dead.letter", site.home / "dead.letter")):
        config.write_text(_handoff(down, f'dead_letter = "{value}"\n', data_dir="data"))
        subject = _subject("kept")
        r = _run([str(SENDMAIL), RCPT], env, cwd=site.web, input=_message(subject))
        assert r.returncode == 75 and "cannot reach" in r.stderr, r.stderr
        assert f"kept in {where}" in r.stderr
        _kept(where, subject, NOBODY)
    assert site.web_files() == []
    config.write_text(_handoff(pr.smtp_port, 'dead_letter = "data/dead.letter"\n',
                               data_dir="data"))
    _legitimate_send(pr, site, env)


def test_no_other_option_writes_a_file_or_changes_mode(pr: Postroom, site: Site) -> None:
    """Every option Postfix's sendmail takes that, in Sendmail, names a file (-X log, -O/-o
    queue or alias file, -L, -V...) is accepted and ignored: nothing is written; modes that
    would do something else (-bs, -bt, -bv, -bd, -bp, -q) are refused before reading."""
    env = _env(site, POSTROOM_CONFIG=str(site.config))
    w = site.web
    subject = _subject("ignored-options")
    r = _run([str(SENDMAIL), "-X", f"{w}/x.php", f"-X{w}/y.php", "-O", f"QueueDirectory={w}",
              f"-oQ{w}", f"-oA{w}/aliases", f"-oL{w}/log", "-L", "label", "-N", "never",
              "-V", "envid", "-R", "hdrs", "-h", "5", "-p", "x", "-B", "8BITMIME", "-e", "x",
              "-Ac", "-U", "-G", "-x", "-n", "-m", "-c", "-i", "-t"], env, cwd=w,
             input=_message(subject))
    assert r.returncode == 0, r.stderr
    assert _stored(pr.db, subject)["recipients"] == [RCPT]
    for mode in ("-bs", "-bt", "-bv", "-bd", "-bp", "-q", "-qR"):
        r = _run([str(SENDMAIL), mode, RCPT], env, cwd=w, input=_message(_subject(mode)))
        assert r.returncode == 64, (mode, r.stderr)
        _one_line_each(r)
    for mode in ("-bi", "-bh", "-bH", "-I"):
        r = _run([str(SENDMAIL), mode], env, cwd=w)
        assert r.returncode == 0 and r.stderr == "", (mode, r.stderr)
    assert site.web_files() == [] and not (site.home / "dead.letter").exists()
    _legitimate_send(pr, site, env)
