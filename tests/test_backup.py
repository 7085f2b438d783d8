"""`postroom backup` / `restore` (postroom.backup) against a real `postroom serve` taking a
stream of SMTP mail: the backup is taken while mail flows, restored into another folder,
and every message acknowledged before it started is there. Then what restore refuses (a
wrong passphrase, a running server's database, a database with data without --force) and
what backup refuses (no passphrase, PostgreSQL)."""

from __future__ import annotations

import smtplib
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from serve_proc import Postroom, free_port, smtp_connection

HOST = "127.0.0.1"
PASSPHRASE = "correct horse battery staple"
ENV = {"PR_PASS": PASSPHRASE, "PR_WRONG": "not the passphrase at all"}


@dataclass
class Stream:
    """One SMTP client handing messages to Postroom until stopped; the acknowledged ids."""

    port: int
    acked: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    error: list[BaseException] = field(default_factory=list)

    def run(self) -> None:
        try:
            with smtplib.SMTP(HOST, self.port, timeout=30) as s:
                s.ehlo("client.test")
                for n in range(100_000):  # bounded; stopped long before
                    if self.stop.is_set():
                        return
                    s.mail("app@example.org")
                    s.rcpt("someone@example.net")
                    body = (f"From: app@example.org\r\nTo: someone@example.net\r\nSubject: "
                            f"backup {n}\r\nMessage-ID: <{uuid.uuid4().hex}@example.org>\r\n"
                            f"\r\nmessage {n}\r\n").encode()
                    code, reply = s.data(body)
                    assert code == 250, reply
                    self.acked.append(reply.decode().rsplit(" ", 1)[-1])
        except BaseException as err:  # reported by the test, not lost in the thread
            self.error.append(err)

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.acked) < count and not self.error and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.error, self.error
        assert len(self.acked) >= count, f"only {len(self.acked)} acknowledged in {timeout}s"


@dataclass
class Taken:
    live: Postroom
    file: Path
    before: list[str]  # acknowledged before the backup started
    run: Any  # the backup command's CompletedProcess
    during: int  # acknowledged while the backup ran


@pytest.fixture(scope="module")
def taken(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Taken]:
    """A backup of a serving instance (its upstream down: deliveries keep failing and
    writing attempts too) taken while a client streams messages into it."""
    root = tmp_path_factory.mktemp("backup")
    live = Postroom(root / "live", connections=smtp_connection(free_port()), env=ENV)
    with live:
        stream = Stream(live.smtp_port)
        thread = threading.Thread(target=stream.run, daemon=True)
        thread.start()
        try:
            stream.wait_for(30)
            before = list(stream.acked)
            file = root / "instance.backup"
            run = live.cli("backup", str(file), "--passphrase-env", "PR_PASS", timeout=120)
            during = len(stream.acked) - len(before)
            stream.wait_for(len(stream.acked) + 5)  # still flowing after it
        finally:
            stream.stop.set()
            thread.join(30)
        yield Taken(live, file, before, run, during)


def restored_ids(db: Path) -> tuple[set[str], list[str]]:
    with sqlite3.connect(db) as con:
        ids = {r[0] for r in con.execute("SELECT id FROM messages")}
        check = [r[0] for r in con.execute("PRAGMA integrity_check")]
    return ids, check


def test_backup_while_mail_flows_restores_every_acknowledged_message(
        taken: Taken, tmp_path: Path) -> None:
    assert taken.run.returncode == 0, taken.run.stderr.decode()
    assert taken.during > 0  # mail kept being accepted while the backup ran
    assert taken.file.stat().st_mode & 0o777 == 0o600
    assert not [p for p in taken.file.parent.iterdir() if p.name.startswith(".")]  # no staging
    other = Postroom(tmp_path / "other", env=ENV)
    out = other.cli("restore", str(taken.file), "--passphrase-env", "PR_PASS")
    assert out.returncode == 0, out.stderr.decode()
    ids, check = restored_ids(other.db)
    assert check == ["ok"]
    missing = set(taken.before) - ids
    assert not missing, f"{len(missing)} acknowledged message(s) not in the backup"
    assert (other.root / "data" / "secret.key").read_bytes() == (
        taken.live.root / "data" / "secret.key").read_bytes()
    assert (other.root / "data" / "postroom.toml.from-backup").read_text() == (
        taken.live.config.read_text())
    shown = other.cli("show", taken.before[0])  # today's code reads the restored database
    assert shown.returncode == 0 and taken.before[0] in shown.stdout.decode(), shown.stderr

    again = other.cli("restore", str(taken.file), "--passphrase-env", "PR_PASS")
    assert again.returncode == 2 and b"--force" in again.stderr
    forced = other.cli("restore", str(taken.file), "--passphrase-env", "PR_PASS", "--force")
    assert forced.returncode == 0, forced.stderr.decode()
    kept = list((other.root / "data").glob("postroom.db.replaced-*Z"))  # and its -wal, -shm
    assert len(kept) == 1 and restored_ids(kept[0])[0] == ids


def test_wrong_passphrase_writes_nothing(taken: Taken, tmp_path: Path) -> None:
    target = Postroom(tmp_path / "target", env=ENV)
    out = target.cli("restore", str(taken.file), "--passphrase-env", "PR_WRONG")
    assert out.returncode == 2
    assert b"wrong passphrase" in out.stderr and b"Traceback" not in out.stderr
    assert not (target.root / "data").exists()


def test_restore_refuses_a_database_a_server_has_open(taken: Taken) -> None:
    out = taken.live.cli("restore", str(taken.file), "--passphrase-env", "PR_PASS", "--force")
    assert out.returncode == 1 and b"store.in_use" in out.stderr, out.stderr


def test_backup_refuses_without_a_passphrase_and_for_postgresql(taken: Taken,
                                                                 tmp_path: Path) -> None:
    file = tmp_path / "none.backup"
    out = taken.live.cli("backup", str(file), input=b"")  # no terminal, no option
    assert out.returncode == 2 and b"--passphrase-env" in out.stderr
    assert not file.exists()
    pg = Postroom(tmp_path / "pg", env=ENV,
                  server='database = "postgresql://postroom:s3cret@127.0.0.1:9/mail"\n')
    out = pg.cli("backup", str(file), "--passphrase-env", "PR_PASS")
    text = out.stderr.decode()
    assert out.returncode == 2, text
    assert "pg_dump --format=custom" in text and "postgresql://postroom@127.0.0.1:9/mail" in text
    assert "s3cret" not in text and "secret.key" in text
    assert not file.exists()


def test_a_sealed_stream_of_many_chunks_reads_back_and_detects_cuts(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """postroom.passcrypt's stream (the backup's encryption) beyond one chunk: read back
    whole, refused cut at a chunk boundary, altered, or under another passphrase."""
    import io
    import os

    from postroom import passcrypt
    from postroom.exceptions import ConfigError

    monkeypatch.setattr(passcrypt, "SCRYPT", {"n": 2**10, "r": 8, "p": 1})  # fast, same code
    plain = os.urandom(passcrypt.CHUNK * 2 + 12345)
    sink = io.BytesIO()
    writer = passcrypt.SealedWriter(sink, PASSPHRASE, "postroom-backup")
    for at in range(0, len(plain), 10_000):
        writer.write(plain[at:at + 10_000])
    writer.close()
    sealed = sink.getvalue()

    def read(data: bytes, passphrase: str = PASSPHRASE) -> bytes:
        reader = passcrypt.SealedReader(io.BytesIO(data), passphrase, "postroom-backup",
                                        what="the test file")
        return b"".join(iter(lambda: reader.read(7_000), b""))

    assert read(sealed) == plain
    header = sealed.index(b"\n") + 1
    cut = sealed[:header + 2 * (passcrypt.CHUNK + 16)]  # the last chunk dropped
    altered = bytearray(sealed)
    altered[header + passcrypt.CHUNK + 100] ^= 1
    for data, passphrase, code in ((cut, PASSPHRASE, "postroom-backup.damaged"),
                                   (bytes(altered), PASSPHRASE, "postroom-backup.damaged"),
                                   (sealed, "another passphrase!", "postroom-backup.passphrase"),
                                   (b"PK\x03\x04 a zip", PASSPHRASE, "postroom-backup.format")):
        with pytest.raises(ConfigError) as caught:
            read(data, passphrase)
        assert caught.value.code == code
