"""The admin protocol (pure), the handlers on a real store, and the server on a real socket.

Process-level behaviour (the CLI, ``serve``, signals, the store lock) is in test_cli.py.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import shutil
import socket
import stat
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailharbor.admin import protocol as p
from mailharbor.admin.client import AdminClient, NodeNotRunning, make_request
from mailharbor.admin.server import (
    HANDLERS,
    AdminContext,
    AdminServer,
    AdminSocketError,
    execute,
)
from mailharbor.service.auth import FAST_TEST_PARAMS, hash_password
from mailharbor.store import Store

pytestmark = pytest.mark.timeout(60)

NODE_ID = bytes(range(16))


def fast_hash(password: str) -> str:
    return hash_password(password, params=FAST_TEST_PARAMS)


@pytest.fixture
def short_dir(unique_name: str) -> Iterator[Path]:
    """A directory with a short path (Unix socket paths are limited to 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_ctx(store: Store, **kw: object) -> AdminContext:
    ctx = AdminContext(
        store=store, node_name="mx1", status=lambda: {"node": "mx1", "state": "running"}
    )
    ctx.hash_password = fast_hash
    for k, v in kw.items():
        setattr(ctx, k, v)
    return ctx


async def run(ctx: AdminContext, cmd: str, **args: object) -> p.Response:
    return await execute(ctx, make_request(cmd, args))


# --- protocol -----------------------------------------------------------------------------------


def line(obj: object) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def test_every_command_has_a_handler() -> None:
    assert set(HANDLERS) == set(p.COMMANDS)


def test_protocol_module_is_pure() -> None:
    """admin/protocol.py does no I/O: standard library only, and none of its I/O modules."""
    tree = ast.parse(Path(p.__file__).read_text())
    imported = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            imported |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.module:
            imported.add(n.module.split(".")[0])
    assert imported <= set(sys.stdlib_module_names) | {"__future__"}, imported
    assert not imported & {"asyncio", "socket", "os", "io", "selectors", "ssl", "time"}


def test_decode_a_valid_request() -> None:
    req = p.decode_request(
        line(
            {
                "id": 7,
                "cmd": "account.add",
                "args": {"address": "a@example.org", "password": "pw", "quota_bytes": 5},
            }
        )
    )
    assert req.id == 7 and req.cmd == "account.add"
    assert dict(req.args) == {"address": "a@example.org", "password": "pw", "quota_bytes": 5}
    assert p.decode_request(line({"id": "x", "cmd": "status", "v": 1})).args == {}


def test_request_round_trip() -> None:
    req = make_request("alias.add", {"source": "a@example.org", "targets": ["b@x.org"]})
    back = p.decode_request(p.encode_request(req))
    assert back.cmd == req.cmd and back.id == req.id
    assert back.args["targets"] == ("b@x.org",)


@pytest.mark.parametrize(
    ("obj", "needle"),
    [
        ({"id": 1, "cmd": "nope"}, "unknown command 'nope'"),
        ({"id": 1, "cmd": "domain.add", "args": {}}, "missing argument 'name'"),
        ({"id": 1, "cmd": "domain.add", "args": {"name": "x", "y": 1}}, "unknown argument 'y'"),
        ({"id": 1, "cmd": "domain.add", "args": {"name": 5}}, "must be a string"),
        (
            {"id": 1, "cmd": "account.quota", "args": {"address": "a@b.c", "quota_bytes": True}},
            "must be an integer",
        ),
        (
            {"id": 1, "cmd": "account.quota", "args": {"address": "a@b.c", "quota_bytes": -1}},
            "must be between",
        ),
        ({"id": 1, "cmd": "alias.add", "args": {"source": "a@b.c", "targets": []}}, "items"),
        ({"id": 1, "cmd": "alias.add", "args": {"source": "a@b.c", "targets": [1]}}, "strings"),
        ({"id": 1, "cmd": "status", "args": []}, '"args" must be a JSON object'),
        ({"id": 1, "cmd": "status", "v": 2}, "unsupported admin protocol version"),
        ({"id": 1, "cmd": "status", "extra": 1}, "unknown request field"),
        ({"id": 1}, '"cmd" must be a string'),
    ],
)
def test_bad_requests_are_refused_with_one_line(obj: object, needle: str) -> None:
    with pytest.raises(p.RequestError) as exc:
        p.decode_request(line(obj))
    assert needle in exc.value.message
    assert "\n" not in exc.value.message
    assert exc.value.id == 1 or "id" not in obj  # type: ignore[operator]


@pytest.mark.parametrize("raw", [b"not json\n", b"[1,2]\n", b"\xff\xfe\n", b'{"id": true}\n'])
def test_garbage_is_refused(raw: bytes) -> None:
    with pytest.raises(p.RequestError):
        p.decode_request(raw)


def test_oversized_request_is_refused() -> None:
    big = line({"id": 1, "cmd": "domain.add", "args": {"name": "x" * p.MAX_REQUEST_BYTES}})
    with pytest.raises(p.RequestError, match="longer than"):
        p.decode_request(big)


def test_describe_hides_secrets() -> None:
    req = make_request("account.passwd", {"address": "a@example.org", "password": "hunter2"})
    text = req.describe()
    assert "hunter2" not in text and "<secret>" in text and "a@example.org" in text


def test_response_encoding() -> None:
    ok = p.decode_response(p.encode_response(p.Response.success(3, {"a": [1]})))
    assert ok == p.Response(3, True, {"a": [1]})
    bad = p.decode_response(p.encode_response(p.Response.failure(4, "two\nlines")))
    assert bad.ok is False and bad.error == "two lines"
    with pytest.raises(p.ResponseError):
        p.decode_response(b'{"id": 1}\n')


# --- handlers on a real store -------------------------------------------------------------------


def test_handlers_change_and_read_the_store(tmp_path: Path) -> None:
    async def go() -> None:
        store = Store.open(str(tmp_path / "data"), node_id=NODE_ID)
        try:
            ctx = make_ctx(store)
            assert (await run(ctx, "domain.add", name="Example.ORG")).result == {
                "name": "example.org",
                "lsn": 1,
            }
            r = await run(
                ctx, "account.add", address="Alice@example.org", password="pw", quota_bytes=10
            )
            assert r.ok, r
            acct = store.index.account_by_address("alice@example.org")
            assert acct is not None and acct.quota_bytes == 10
            assert PasswordHasher().verify(acct.password_hash, "pw")
            assert (await run(ctx, "account.passwd", address="alice@example.org", password="n")).ok
            acct = store.index.account_by_address("alice@example.org")
            assert acct is not None and PasswordHasher().verify(acct.password_hash, "n")
            assert (await run(ctx, "account.quota", address="alice@example.org", quota_bytes=0)).ok
            lst = (await run(ctx, "account.list")).result
            assert lst == [
                {"address": "alice@example.org", "quota_bytes": 0, "used_bytes": 0, "messages": 0}
            ]
            assert (await run(ctx, "alias.add", source="pm@example.org", targets=["a@x.org"])).ok
            r = await run(ctx, "alias.add", source="pm@example.org", targets=["b@x.org", "a@x.org"])
            assert r.result["targets"] == ["a@x.org", "b@x.org"]  # type: ignore[index]
            assert (await run(ctx, "domain.list")).result == [
                {"name": "example.org", "accounts": 1, "aliases": 1}
            ]
            r = await run(ctx, "domain.remove", name="example.org")
            assert not r.ok and "remove them first" in r.error
            assert (await run(ctx, "alias.remove", source="PM@example.org")).ok
            assert (await run(ctx, "account.remove", address="alice@example.org")).ok
            assert (await run(ctx, "domain.remove", name="example.org")).ok
            stats = (await run(ctx, "store.stats")).result
            assert isinstance(stats, dict) and stats["domains"] == 0
            assert (await run(ctx, "store.compact")).ok
            assert (await run(ctx, "status")).result == {"node": "mx1", "state": "running"}
        finally:
            store.close()

    asyncio.run(go())


def test_handler_errors_are_one_line_responses(tmp_path: Path) -> None:
    async def go() -> None:
        store = Store.open(str(tmp_path / "data"), node_id=NODE_ID)
        try:
            ctx = make_ctx(store)
            r = await run(ctx, "account.add", address="a@nowhere.org", password="pw")
            assert r == p.Response(
                r.id, False, None, "the domain of a@nowhere.org is not a local domain"
            )
            r = await run(ctx, "account.add", address="not an address", password="pw")
            assert not r.ok and "invalid address" in r.error
            await run(ctx, "domain.add", name="example.org")
            r = await run(ctx, "domain.add", name="example.org")
            assert not r.ok and "already exists" in r.error
            r = await run(ctx, "account.add", address="a@example.org", password="")
            assert not r.ok and "password must not be empty" in r.error
            r = await run(ctx, "account.passwd", address="zz@example.org", password="x")
            assert not r.ok and "no account zz@example.org" in r.error
            r = await run(ctx, "alias.remove", source="zz@example.org")
            assert not r.ok and "no alias" in r.error

            def boom(password: str) -> str:
                raise RuntimeError("secret internals")

            ctx.hash_password = boom
            r = await run(ctx, "account.add", address="b@example.org", password="pw")
            assert not r.ok
            assert r.error == "internal error in account.add (see the log of node mx1)"
        finally:
            store.close()

    asyncio.run(go())


def test_password_hashing_runs_off_the_event_loop(tmp_path: Path) -> None:
    threads: list[int] = []

    def recording_hash(password: str) -> str:
        threads.append(threading.get_ident())
        return fast_hash(password)

    async def go() -> None:
        store = Store.open(str(tmp_path / "data"), node_id=NODE_ID)
        try:
            ctx = make_ctx(store, hash_password=recording_hash)
            await run(ctx, "domain.add", name="example.org")
            assert (await run(ctx, "account.add", address="a@example.org", password="pw")).ok
        finally:
            store.close()

    asyncio.run(go())
    assert threads and threading.get_ident() not in threads


def test_concurrent_alias_adds_are_serialized(tmp_path: Path) -> None:
    async def go() -> None:
        store = Store.open(str(tmp_path / "data"), node_id=NODE_ID)
        try:
            ctx = make_ctx(store)
            await run(ctx, "domain.add", name="example.org")
            results = await asyncio.gather(
                *(
                    run(ctx, "alias.add", source="all@example.org", targets=[f"u{i}@x.org"])
                    for i in range(10)
                )
            )
            assert all(r.ok for r in results)
            assert sorted(store.index.aliases["all@example.org"]) == sorted(
                f"u{i}@x.org" for i in range(10)
            )
        finally:
            store.close()

    asyncio.run(go())


# --- the server on a real socket ----------------------------------------------------------------


def raw_exchange(path: Path, data: bytes) -> list[bytes]:
    """Send ``data`` on a fresh connection, half-close, return the lines answered."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(path))
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        buf = b""
        while chunk := s.recv(65536):
            buf += chunk
    return buf.splitlines()


def test_server_on_a_real_socket(short_dir: Path) -> None:
    sock_path = short_dir / "admin.sock"

    async def go() -> None:
        store = Store.open(str(short_dir / "data"), node_id=NODE_ID)
        server = AdminServer(sock_path, make_ctx(store), max_request_bytes=4096)
        try:
            await server.start()
            assert stat.S_IMODE(sock_path.stat().st_mode) == 0o600
            client = AdminClient(sock_path)

            r = await asyncio.to_thread(client.call, "domain.add", {"name": "example.org"})
            assert r.ok and store.index.domains == {"example.org"}

            # Several requests on one connection, garbage in between: answered in order.
            lines = await asyncio.to_thread(
                raw_exchange,
                sock_path,
                line({"id": 1, "cmd": "domain.list"})
                + b"garbage\n"
                + line({"id": 3, "cmd": "nope"})
                + line({"id": 4, "cmd": "status"}),
            )
            answers = [json.loads(x) for x in lines]
            assert [a["ok"] for a in answers] == [True, False, False, True]
            assert answers[0]["id"] == 1 and answers[2]["id"] == 3 and answers[3]["id"] == 4
            assert "unknown command" in answers[2]["error"]

            # An oversized line: one error, then the connection is closed.
            lines = await asyncio.to_thread(
                raw_exchange, sock_path, b"x" * 10000 + b"\n" + line({"id": 9, "cmd": "status"})
            )
            assert len(lines) == 1 and "longer than 4096" in json.loads(lines[0])["error"]

            # A second server on the same live path is refused.
            other = AdminServer(sock_path, make_ctx(store))
            with pytest.raises(AdminSocketError, match="in use by another running node"):
                await other.start()
        finally:
            await server.close()
            store.close()
        assert not sock_path.exists()
        with pytest.raises(NodeNotRunning):
            AdminClient(sock_path).call("status")

    asyncio.run(go())


def test_stale_socket_is_replaced_and_non_socket_refused(short_dir: Path) -> None:
    sock_path = short_dir / "admin.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: what a killed node leaves
    with pytest.raises(NodeNotRunning):
        AdminClient(sock_path).call("status")

    async def go() -> None:
        store = Store.open(str(short_dir / "data"), node_id=NODE_ID)
        try:
            server = AdminServer(sock_path, make_ctx(store))
            await server.start()
            assert (await asyncio.to_thread(AdminClient(sock_path).call, "status")).ok
            await server.close()
            (short_dir / "file").write_text("x")
            with pytest.raises(AdminSocketError, match="not a socket"):
                await AdminServer(short_dir / "file", make_ctx(store)).start()
        finally:
            store.close()

    asyncio.run(go())


def test_close_lets_a_running_request_finish(short_dir: Path) -> None:
    sock_path = short_dir / "admin.sock"
    started = threading.Event()
    release = threading.Event()

    def slow_hash(password: str) -> str:
        started.set()
        release.wait(10)
        return fast_hash(password)

    async def go() -> None:
        store = Store.open(str(short_dir / "data"), node_id=NODE_ID)
        try:
            ctx = make_ctx(store, hash_password=slow_hash)
            await run(ctx, "domain.add", name="example.org")
            server = AdminServer(sock_path, ctx)
            await server.start()
            client = AdminClient(sock_path)
            pending = asyncio.ensure_future(
                asyncio.to_thread(
                    client.call, "account.add", {"address": "a@example.org", "password": "pw"}
                )
            )
            await asyncio.to_thread(started.wait, 10)
            closing = asyncio.ensure_future(server.close())
            await asyncio.sleep(0.2)
            assert not closing.done()
            release.set()
            r = await pending
            await closing
            assert r.ok, r
            assert store.index.account_by_address("a@example.org") is not None
        finally:
            store.close()

    asyncio.run(go())


NOBODY = 65534


def call_as_nobody(path: Path) -> str:
    """Connect to ``path`` as user nobody (a forked child, so no interpreter has to be found
    that nobody may run) and ask for ``status``; return what happened."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: only raw socket calls, then _exit
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                answer = raw_exchange(path, line({"id": 1, "cmd": "status"}))
                out = b"answer: " + b"".join(answer)
            except PermissionError:
                out = b"EACCES"
            except Exception as e:
                out = repr(e).encode()
            os.write(wfd, out)
        finally:
            os._exit(0)
    os.close(wfd)
    try:
        chunks = []
        while chunk := os.read(rfd, 65536):
            chunks.append(chunk)
    finally:
        os.close(rfd)
        os.waitpid(pid, 0)
    return b"".join(chunks).decode()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_other_users_are_refused(short_dir: Path) -> None:
    """Mode 0600 keeps other users out; SO_PEERCRED refuses them even if the mode is widened."""
    short_dir.chmod(0o755)
    sock_path = short_dir / "admin.sock"

    async def go() -> None:
        store = Store.open(str(short_dir / "data"), node_id=NODE_ID)
        server = AdminServer(sock_path, make_ctx(store))
        try:
            await server.start()
            out = await asyncio.to_thread(call_as_nobody, sock_path)
            assert out == "EACCES"
            sock_path.chmod(0o666)
            out = await asyncio.to_thread(call_as_nobody, sock_path)
            assert out.startswith("answer: {"), out
            assert json.loads(out.removeprefix("answer: ")) == {
                "id": 1,
                "ok": False,
                "error": "permission denied",
            }
        finally:
            await server.close()
            store.close()

    asyncio.run(go())


def test_connection_limit_and_idle_timeout(short_dir: Path) -> None:
    sock_path = short_dir / "admin.sock"

    async def go() -> None:
        store = Store.open(str(short_dir / "data"), node_id=NODE_ID)
        server = AdminServer(sock_path, make_ctx(store), max_connections=1, idle_timeout=0.5)
        idle = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await server.start()
            idle.connect(str(sock_path))
            await asyncio.sleep(0.1)  # let the server accept it
            r = await asyncio.to_thread(AdminClient(sock_path).call, "status")
            assert not r.ok and r.error == "too many admin connections"
            idle.settimeout(5)
            assert await asyncio.to_thread(idle.recv, 100) == b""  # closed when idle
            await asyncio.sleep(0.1)
            assert (await asyncio.to_thread(AdminClient(sock_path).call, "status")).ok
        finally:
            idle.close()
            await server.close()
            store.close()

    asyncio.run(go())


class _Roles:
    """A replication stand-in that records role changes."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def is_primary(self) -> bool:
        return True

    async def promote(self, *, force: bool = False, reason: str = "") -> dict[str, object]:
        self.calls.append("promote")
        return {"role": "primary"}

    async def demote(self) -> dict[str, object]:
        self.calls.append("demote")
        return {"role": "secondary"}


class _Manager:
    def status(self) -> dict[str, object]:
        return {}

    async def admin_command(self, kind: str, node: str, *, force: bool) -> dict[str, object]:
        return {}


def test_repl_role_commands_are_refused_when_a_cluster_manager_runs(tmp_path: Path) -> None:
    async def go() -> None:
        store = Store.open(str(tmp_path / "data"), node_id=NODE_ID)
        try:
            roles = _Roles()
            ctx = make_ctx(store, repl=roles, cluster=_Manager())
            for cmd, args in (("repl.primary", {"force": True}), ("repl.secondary", {})):
                r = await run(ctx, cmd, **args)
                assert not r.ok and r.error is not None
                assert "cluster manager" in r.error and "cluster switchover" in r.error, r.error
            assert "cluster standby" in r.error
            assert roles.calls == []  # the role controller was never asked
            ctx.cluster = None  # without [cluster] the commands go through
            assert (await run(ctx, "repl.primary")).ok
            assert (await run(ctx, "repl.secondary")).ok
            assert roles.calls == ["promote", "demote"]
        finally:
            store.close()

    asyncio.run(go())


def test_an_offline_queue_command_loads_neither_replication_nor_the_queue_runner() -> None:
    """`mailharbor queue list` on a stopped node runs the admin handler in the CLI's process:
    it must not pay for the replication package or the queue runner's SMTP client and DNS
    resolver (the queue commands use service.queue_admin, which needs the store only)."""
    import subprocess

    base = Path(tempfile.mkdtemp(prefix="offline-queue-"))
    try:
        cli = Path(sys.executable).parent / "mailharbor"
        subprocess.run([str(cli), "init", str(base / "n")], check=True, capture_output=True)
        code = "from mailharbor.cli.main import main; raise SystemExit(main())"
        argv = ["queue", "list", "--config", str(base / "n" / "mailharbor.toml")]
        r = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", code, *argv],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr[-2000:]
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()}
        heavy = {"aiosmtplib", "dns.resolver", "mailharbor.repl", "mailharbor.service.queue"}
        assert "mailharbor.service.queue_admin" in imported  # the command did run
        assert not heavy & imported, sorted(heavy & imported)
    finally:
        shutil.rmtree(base, ignore_errors=True)
