"""`postroom log`, `show` and `queue list` answered by a running `postroom serve`
(postroom.control, issue 16): the same output byte for byte as when the command reads the
database itself, without SQLAlchemy, pydantic or Typer in the command's process; the usual
way whenever serve cannot answer; and serve's socket answers reads only, to its own user.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from serve_proc import Postroom, free_port, smtp_connection
from test_cli_startup import PROBE

from postroom import control, settings
from postroom.runtime import Instance

HEAVY = ("sqlalchemy", "pydantic", "typer", "postroom.settings", "postroom.store.log")


def run(p: Postroom, *args: str, direct: bool = False) -> tuple[bytes, set[str]]:
    """stdout of `postroom ARGS --config ...` (as the installed command starts) and the
    modules its process held at the end."""
    env = {**p.env, "COLUMNS": "120"}
    if direct:
        env[control.DIRECT_ENV] = "1"
    res = subprocess.run([sys.executable, "-c", PROBE, *args, "--config", str(p.config)],
                         capture_output=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr.decode()
    return res.stdout, set(json.loads(res.stderr.decode().strip().splitlines()[-1]))


def wait_socket(p: Postroom, timeout: float = 20.0) -> Path:
    path = p.root / "data" / control.SOCKET_NAME
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, "serve made no cli.sock"
        time.sleep(0.05)
    return path


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Postroom, list[str]]]:
    """A running serve holding three messages, one with markup in its subject, each tried
    once through a connection nobody answers (an attempt, its advice) and deferred."""
    p = Postroom(tmp_path_factory.mktemp("reads"), connections=smtp_connection(free_port()),
                 delivery="min_backoff = 600\nmax_backoff = 600\npoll_interval = 0.2\n")
    ids = []
    for n, subject in enumerate(["[URGENT] first [/]", "second", "third"]):
        res = p.cli("send", "--from", f"a{n}@example.com", "--to", "b@example.org",
                    "--subject", subject, "--text", "hello")
        assert res.returncode == 0, res.stderr
        ids.append(res.stdout.decode().split()[-1])
    p.start()
    try:
        wait_socket(p)
        deadline = time.monotonic() + 60
        while any(json.loads(line)["status"] != "deferred"
                  for line in run(p, "log", "--json")[0].splitlines()):
            assert time.monotonic() < deadline, "not tried"
            time.sleep(0.2)
        yield p, ids
    finally:
        p.stop()


CASES = [
    ["log"], ["log", "--limit", "1"], ["log", "--json"], ["log", "--to", "b@example.org"],
    ["log", "--from", "a1@example.com", "--status", "queued"], ["log", "--text=second"],
    ["log", "--since", "1h", "--until", "2099-01-01"], ["log", "--status", "failed"],
    ["queue", "list"], ["queue", "list", "--json"], ["queue", "list", "--status", "queued",
                                                     "--status", "deferred", "--limit", "2"],
    ["queue", "list", "--to", "b@", "--from", "a0", "--priority", "normal"],
    ["queue", "list", "--due", "--json"], ["log", "--status", "deferred", "--json"],
]


@pytest.mark.parametrize("args", CASES, ids=" ".join)
def test_the_answer_of_serve_is_the_direct_output_byte_for_byte(
        served: tuple[Postroom, list[str]], args: list[str]) -> None:
    p, _ = served
    for _ in range(3):  # `queue list`'s "due (12s ago)" may move on between the two
        fast, modules = run(p, *args)
        slow, direct_modules = run(p, *args, direct=True)
        if fast == slow:
            break
    assert "postroom.control" in modules and "sqlalchemy" in direct_modules
    for heavy in HEAVY:
        assert heavy not in modules, heavy
    assert fast == slow
    assert fast.strip() or "--due" in args  # nothing is due: deferred by 600 s


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_show_is_the_same_both_ways(served: tuple[Postroom, list[str]],
                                    json_flag: list[str]) -> None:
    p, ids = served
    for msg_id in (ids[0], ids[1][:8]):  # an id, a prefix
        fast, modules = run(p, "show", msg_id, *json_flag)
        slow, _ = run(p, "show", msg_id, *json_flag, direct=True)
        assert fast == slow and b"URGENT" in run(p, "show", ids[0])[0]
        assert b"attempt" in fast and (json_flag or b"fix" in fast)
        assert "sqlalchemy" not in modules and "typer" not in modules


def test_what_serve_cannot_answer_goes_the_usual_way(served: tuple[Postroom, list[str]]
                                                     ) -> None:
    p, ids = served
    for args in (["show", "nosuchid"], ["show", ids[0], "--raw"], ["log", "--status", "nope"],
                 ["log", "--limit", "0"], ["log", "--limit", str(control.MAX_ROWS + 1)]):
        res = subprocess.run([sys.executable, "-c", PROBE, *args, "--config", str(p.config)],
                             capture_output=True, env=p.env, timeout=120)
        assert "sqlalchemy" in res.stderr.decode() or "typer" in res.stderr.decode(), args
    raw = subprocess.run([sys.executable, "-m", "postroom.cli", "show", ids[0], "--raw",
                          "--config", str(p.config)], capture_output=True, env=p.env,
                         timeout=120)
    assert raw.returncode == 0 and b"Subject:" in raw.stdout


def test_without_a_running_serve_the_command_reads_the_database(tmp_path: Path) -> None:
    p = Postroom(tmp_path)
    assert p.cli("send", "--from", "a@example.com", "--to", "b@example.org", "--text",
                 "x").returncode == 0
    path = tmp_path / "data" / control.SOCKET_NAME
    out, modules = run(p, "log")
    assert b"1 message(s)" in out and "sqlalchemy" in modules
    # a socket left by a serve killed with -9: nobody listens, the command goes on
    left = control.listen(path)
    left.close()
    assert path.exists() and control.trusted_socket(path)
    assert run(p, "log")[0] == out


def test_the_socket_is_the_users_alone(served: tuple[Postroom, list[str]]) -> None:
    p, _ = served
    path = wait_socket(p)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert control.trusted_socket(path)
    copy = p.root / "open.sock"
    sock = control.listen(copy)
    try:
        os.chmod(copy, 0o666)
        assert not control.trusted_socket(copy)  # open to others: not asked
    finally:
        sock.close()


def ask_raw(path: Path, data: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(20)
        s.connect(str(path))
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_serve_answers_reads_of_its_own_version_and_configuration_only(
        served: tuple[Postroom, list[str]]) -> None:
    p, _ = served
    path = wait_socket(p)
    good = {"op": "log", "filter": dict.fromkeys(control.LOG_FILTER), "limit": 1,
            "json": True, "protocol": control.PROTOCOL, "version": control.__version__,
            "configfile": str(p.config.resolve()), "env": control.overrides(p.env)}
    assert json.loads(ask_raw(path, json.dumps(good).encode() + b"\n"))["ok"] is True
    for changed in ({"version": "0.0.0"}, {"protocol": 0}, {"configfile": "/etc/other.toml"},
                    {"env": {"POSTROOM_DELIVERY__MAX_TRIES": "3"}}):
        answer = json.loads(ask_raw(path, json.dumps({**good, **changed}).encode() + b"\n"))
        assert answer == {"ok": False, "mismatch": True}, changed
    for op in ("retry", "purge", "pause", "resend", "delete"):
        answer = json.loads(ask_raw(path, json.dumps({**good, "op": op}).encode() + b"\n"))
        assert answer == {"ok": False}, op
    assert json.loads(ask_raw(path, json.dumps({**good, "limit": 10**9}).encode()
                              + b"\n")) == {"ok": False}
    # a request over the size limit gets no answer
    assert ask_raw(path, b"{" + b" " * (2 * control.MAX_REQUEST) + b"\n") == b""


def test_too_many_clients_at_once_are_closed(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    cfg.write_text('[server]\ndata_dir = "data"\n', encoding="utf-8")
    inst = Instance(settings.load(cfg))

    async def scenario() -> list[bytes]:
        reads = control.ReadSocket(inst)
        assert await reads.start()
        try:
            idle = [await asyncio.open_unix_connection(str(reads.path))
                    for _ in range(control.MAX_CLIENTS)]
            await asyncio.sleep(0.2)
            reader, _ = await asyncio.open_unix_connection(str(reads.path))
            over = await asyncio.wait_for(reader.read(), 5)  # closed unanswered
            for _, w in idle:
                w.close()
            return [over]
        finally:
            reads.close()

    assert asyncio.run(scenario()) == [b""]
    assert not (tmp_path / "data" / control.SOCKET_NAME).exists()
    inst.close()


@pytest.mark.parametrize("argv", [
    ["log", "--help"], ["log", "--retry"], ["log", "--export", "csv"], ["log", "x"],
    ["log", "--to"], ["log", "--to", ""], ["log", "--to", "-x"], ["log", "--to", "a", "--to", "b"],
    ["log", "-cX"], ["log", "--json=1"], ["log", "--limit", "1e3"], ["log", "--since", "soon"],
    ["show"], ["show", "a", "b"], ["show", "a", "--raw"], ["queue"], ["queue", "retry"],
    ["queue", "list", "--priority", "urgent"], ["queue", "list", "--limit", "100001"],
    ["log", "--", "x"], ["send"],
])
def test_forms_left_to_typer(argv: list[str]) -> None:
    assert control.request_from(argv, 0.0) is None


def test_the_requests_filter_is_the_logs() -> None:
    from dataclasses import fields

    from postroom.settings import ServerSettings
    from postroom.store.log import LogFilter

    assert {f.name for f in fields(LogFilter)} == set(control.LOG_FILTER)
    assert str(ServerSettings().data_dir) == control.DEFAULT_DATA_DIR


def test_forms_read_here() -> None:
    req = control.request_from(["log", "-c", "a.toml", "--from=x@y", "--limit", "3"], 0.0)
    assert req is not None and req["config"] == "a.toml" and req["limit"] == 3
    assert req["filter"]["sender"] == "x@y"
    req = control.request_from(["queue", "list", "--status", "queued", "--status", "failed",
                                "--due", "--priority", "high"], 5.0)
    assert req is not None and req["statuses"] == ["queued", "failed"]
    assert req["due_by"] == 5.0 and req["priority"] == 1


def test_the_socket_is_found_as_settings_find_the_data_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "postroom.toml"
    for text, env in (("", {}), ('[server]\ndata_dir = "d"\n', {}),
                      ('[server]\ndata_dir = "/x/../d2"\n', {}),
                      ("", {"POSTROOM_SERVER__DATA_DIR": "e"}),
                      ('[server]\ndata_dir = "d"\n', {"POSTROOM_SERVER__DATA_DIR": '"f g"'})):
        cfg.write_text(text, encoding="utf-8")
        expected = settings.load(cfg, environ=env).data_dir / control.SOCKET_NAME
        assert control.socket_of(str(cfg), env) == (cfg.resolve(), expected), (text, env)
    assert control.socket_of(str(tmp_path / "missing.toml"), {}) is None


def test_hostile_requests_get_no_rows(tmp_path: Path) -> None:
    """Another user reaching the socket (its modes opened by mistake) is closed unanswered
    (SO_PEERCRED); a request nested past json's depth is refused, no traceback."""
    import pwd
    import tempfile

    nobody = pwd.getpwnam("nobody").pw_uid  # the suite runs as root (scripts/test.sh)
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="postroom-cli-sock-"))
    try:
        root.chmod(0o711)
        cfg = root / "postroom.toml"
        cfg.write_text('[server]\ndata_dir = "data"\n', encoding="utf-8")
        inst = Instance(settings.load(cfg))
        client = ("import socket,sys\ns=socket.socket(socket.AF_UNIX)\ns.settimeout(10)\n"
                  "s.connect(sys.argv[1])\ns.sendall(b'{\"op\": \"log\"}\\n')\n"
                  "try:\n    got = s.recv(65536)\n"
                  "except ConnectionResetError:\n    got = b''\n"
                  "sys.stdout.write(repr(got))\n")

        async def scenario() -> tuple[bytes, bytes]:
            reads = control.ReadSocket(inst)
            assert await reads.start()
            try:
                (root / "data").chmod(0o711)
                reads.path.chmod(0o666)
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-I", "-c", client, str(reads.path), user=nobody,
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
                out, err = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode == 0, err
                reader, writer = await asyncio.open_unix_connection(str(reads.path))
                writer.write(b"[" * (control.MAX_REQUEST - 2) + b"\n")
                nested = await asyncio.wait_for(reader.read(), 10)
                writer.close()
                return out, nested
            finally:
                reads.close()

        out, nested = asyncio.run(scenario())
        assert out == b"b''"  # closed (or reset), nothing said
        assert json.loads(nested) == {"ok": False}
        inst.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
