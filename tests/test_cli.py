"""The administration CLI and ``mailharbor serve``, run as a user runs them: the installed command
in subprocesses, on a node directory made by ``mailharbor init``, with and without a node
running (real processes, real sockets, a real store)."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from argon2 import PasswordHasher

from mailharbor.admin.client import AdminClient
from mailharbor.config import Config, load_config
from mailharbor.store import Store, StoreLocked

pytestmark = pytest.mark.timeout(90)

MAILHARBOR = Path(sys.executable).parent / "mailharbor"


@dataclass
class NodeDir:
    """A node directory made by ``mailharbor init``."""

    root: Path
    config_path: Path
    config: Config

    @property
    def data_dir(self) -> Path:
        return self.config.node.data_dir

    def run(
        self, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``mailharbor ARGS --config CONFIG``."""
        return run(*args, "--config", str(self.config_path), stdin=stdin, env=env)

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr
        return result.stdout

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json"))

    def open_store(self) -> Store:
        return Store.open(str(self.data_dir), node_id=self.config.node.node_id)


def run(
    *args: str,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    assert MAILHARBOR.exists(), f"{MAILHARBOR} missing: run `make venv`"
    return subprocess.run(
        [str(MAILHARBOR), *args],
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=cwd,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int = 1) -> str:
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    prefix = "mailharbor: error: " if code == 1 else "mailharbor "
    assert lines[0].startswith(prefix) and "error: " in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def node(unique_name: str) -> Iterator[NodeDir]:
    """A fresh node directory under /tmp (short: the admin socket path is limited)."""
    base = Path(tempfile.mkdtemp(prefix=unique_name + "-"))
    try:
        root = base / "node"
        result = run("init", str(root), "--hostname", "mail.example.org", "--name", "mx1")
        assert result.returncode == 0, result.stderr
        config_path = root / "mailharbor.toml"
        yield NodeDir(root, config_path, load_config(config_path))
    finally:
        shutil.rmtree(base, ignore_errors=True)


class Server:
    """A ``mailharbor serve`` process; its daemon log goes to a file."""

    def __init__(self, node: NodeDir) -> None:
        self.node = node
        self.log_path = node.root / f"serve-{time.monotonic_ns()}.log"
        self._log: IO[bytes] = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(MAILHARBOR), "serve", "--config", str(node.config_path)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace")

    def wait_ready(self, timeout: float = 30) -> None:
        client = AdminClient(self.node.config.admin.socket, timeout=5)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"serve exited with {self.proc.returncode}:\n{self.log}")
            if client.answers():
                return
            time.sleep(0.05)
        pytest.fail(f"serve did not answer within {timeout} s:\n{self.log}")

    def terminate(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        """Make sure the process is gone (for ``finally``)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def serve() -> Iterator[list[Server]]:
    """Start servers with ``Server(node)`` and append them here; they are stopped afterwards."""
    servers: list[Server] = []
    try:
        yield servers
    finally:
        for s in servers:
            s.stop()


def start(servers: list[Server], node: NodeDir) -> Server:
    s = Server(node)
    servers.append(s)
    s.wait_ready()
    return s


def populate(node: NodeDir) -> None:
    node.ok("domain", "add", "example.org")
    node.ok("account", "add", "alice@example.org", "--password-stdin", stdin="s3cret\n")


# --- without a node: the CLI opens the store itself ---------------------------------------------


def test_commands_without_a_node(node: NodeDir) -> None:
    assert node.ok("domain", "add", "Example.ORG").strip() == "domain example.org added"
    assert node.json("domain", "list") == [{"name": "example.org", "accounts": 0, "aliases": 0}]
    out = node.ok(
        "account", "add", "alice@example.org", "--password-stdin", "--quota", "1GiB",
        stdin="correct horse\n",
    )  # fmt: skip
    assert out.strip() == "account alice@example.org added (quota 1GiB)"
    node.ok("account", "add", "bob@example.org", "--password-stdin", stdin="pw\n")
    accounts = node.json("account", "list")
    assert accounts == [
        {"address": "alice@example.org", "quota_bytes": 2**30, "used_bytes": 0, "messages": 0},
        {"address": "bob@example.org", "quota_bytes": 0, "used_bytes": 0, "messages": 0},
    ]
    text = node.ok("account", "list")
    assert "alice@example.org" in text and "1GiB" in text and "ADDRESS" in text

    with node.open_store() as store:
        acct = store.index.account_by_address("alice@example.org")
        assert acct is not None
        assert acct.password_hash.startswith("$argon2id$")
        assert PasswordHasher().verify(acct.password_hash, "correct horse")

    node.ok("account", "passwd", "alice@example.org", "--password-stdin", stdin="new one\n")
    node.ok("account", "quota", "alice@example.org", "500MiB")
    with node.open_store() as store:
        acct = store.index.account_by_address("alice@example.org")
        assert acct is not None and acct.quota_bytes == 500 * 2**20
        assert PasswordHasher().verify(acct.password_hash, "new one")

    node.ok("alias", "add", "postmaster@example.org", "alice@example.org")
    out = node.ok("alias", "add", "postmaster@example.org", "bob@example.org")
    assert out.strip() == "alias postmaster@example.org -> alice@example.org, bob@example.org"
    assert node.json("alias", "list") == [
        {"source": "postmaster@example.org", "targets": ["alice@example.org", "bob@example.org"]}
    ]
    stats = node.json("store", "stats")
    assert isinstance(stats, dict)
    assert stats["accounts"] == 2 and stats["domains"] == 1 and stats["aliases"] == 1
    assert "last_lsn:" in node.ok("store", "stats")

    assert "result: OK" in node.ok("store", "fsck")
    fsck = node.json("store", "fsck")
    assert isinstance(fsck, dict) and fsck["ok"] is True
    assert "compacted:" in node.ok("store", "compact")

    node.ok("alias", "remove", "postmaster@example.org")
    node.ok("account", "remove", "bob@example.org")
    node.ok("account", "remove", "alice@example.org")
    node.ok("domain", "remove", "example.org")
    assert node.ok("domain", "list").strip() == "no domains"

    status = node.run("status")
    assert status.returncode == 3 and "not running" in status.stdout


def test_config_from_environment_and_working_directory(node: NodeDir) -> None:
    env = dict(os.environ, MAILHARBOR_CONFIG=str(node.config_path))
    result = run("domain", "add", "example.org", env=env, cwd=Path("/"))
    assert result.returncode == 0, result.stderr
    env.pop("MAILHARBOR_CONFIG")
    result = run("domain", "list", "--json", env=env, cwd=node.root)
    assert json.loads(result.stdout)[0]["name"] == "example.org"
    line = assert_one_line_error(run("domain", "list", env=env, cwd=Path("/")))
    assert "pass --config FILE or set MAILHARBOR_CONFIG" in line


# --- errors: one line, exit 1, no traceback; the same with and without a node --------------------


@pytest.mark.parametrize("mode", ["direct", "node"])
def test_errors_are_one_line(node: NodeDir, serve: list[Server], mode: str) -> None:
    populate(node)
    if mode == "node":
        start(serve, node)
    cases: list[tuple[tuple[str, ...], str | None, str]] = [
        (("account", "add", "alice@example.org", "--password-stdin"), "x\n", "already exists"),
        (("account", "add", "bob@nowhere.org", "--password-stdin"), "x\n", "not a local domain"),
        (("account", "add", "not an address", "--password-stdin"), "x\n", "invalid address"),
        (
            ("account", "add", "c@example.org", "--quota", "1GB", "--password-stdin"),
            "x\n",
            "invalid quota '1GB'",
        ),
        (("account", "quota", "alice@example.org", "lots"), None, "invalid quota 'lots'"),
        (("account", "add", "c@example.org", "--password-stdin"), "", "no password"),
        (("account", "add", "c@example.org"), None, "--password-stdin"),
        (("account", "passwd", "zz@example.org", "--password-stdin"), "x\n", "no account"),
        (("account", "remove", "zz@example.org"), None, "no account zz@example.org"),
        (("domain", "add", "example.org"), None, "already exists"),
        (("domain", "add", "bad_name.org"), None, "invalid domain name"),
        (("domain", "remove", "example.org"), None, "remove them first"),
        (("domain", "remove", "other.org"), None, "no domain other.org"),
        (("alias", "add", "x@other.org", "alice@example.org"), None, "not a local domain"),
        (("alias", "add", "alice@example.org", "x@y.org"), None, "is an account"),
        (("alias", "remove", "nobody@example.org"), None, "no alias"),
    ]
    # Through a node the cases can run at once (none changes anything); directly, the store
    # lock would serialize them, so they run one by one.
    with ThreadPoolExecutor(8 if mode == "node" else 1) as pool:
        results = list(pool.map(lambda c: node.run(*c[0], stdin=c[1]), cases))
    for (args, _stdin, needle), result in zip(cases, results, strict=True):
        line = assert_one_line_error(result)
        assert needle in line, (args, line)
    # usage errors: exit 2
    assert_one_line_error(node.run("account", "frobnicate"), code=2)
    assert_one_line_error(node.run("alias", "add", "x@example.org"), code=2)
    # nothing was changed by the failures
    assert [a["address"] for a in node.json("account", "list")] == ["alice@example.org"]


def test_bad_config_is_one_line(node: NodeDir) -> None:
    text = node.config_path.read_text()
    assert text.count("\n[store]\n") == 1
    node.config_path.write_text(text.replace("\n[store]\n", "\n[store]\ncache_bytes = -5\n"))
    line = assert_one_line_error(node.run("domain", "list"))
    assert "store.cache_bytes" in line
    line = assert_one_line_error(node.run("serve"))
    assert "store.cache_bytes" in line


# --- with a node: commands go through its admin socket ------------------------------------------


def test_commands_go_through_the_running_node(node: NodeDir, serve: list[Server]) -> None:
    node.ok("domain", "add", "example.org")  # before the node: direct
    server = start(serve, node)

    # While the node runs, the store is locked against direct use.
    with pytest.raises(StoreLocked):
        node.open_store()

    node.ok("account", "add", "alice@example.org", "--password-stdin", stdin="pw1\n")
    node.ok("alias", "add", "postmaster@example.org", "alice@example.org")
    node.ok("account", "quota", "alice@example.org", "2GiB")
    assert [a["address"] for a in node.json("account", "list")] == ["alice@example.org"]
    assert "compacted:" in node.ok("store", "compact")

    # The node did the work: its log has each change, and its status shows the new state.
    log = server.log
    assert 'account.add address="alice@example.org" password=<secret>' in log
    assert 'alias.add source="postmaster@example.org"' in log
    assert "account.quota" in log and "store.compact -> ok" in log
    assert "pw1" not in log  # passwords are never logged
    status = node.json("status")
    assert isinstance(status, dict)
    assert status["node"] == "mx1" and status["state"] == "running"
    assert status["pid"] == server.proc.pid
    assert status["store"]["accounts"] == 1 and status["store"]["aliases"] == 1
    assert status["recovery"]["torn_tail"] is None
    stats = node.json("store", "stats")
    assert isinstance(stats, dict) and stats["commits"] >= 3  # commits made by this process

    # fsck needs exclusive access.
    line = assert_one_line_error(node.run("store", "fsck"))
    assert "node mx1 is running" in line and "stop it first" in line

    # SIGTERM: clean stop, socket removed, lock released, no torn tail.
    assert server.terminate() == 0
    assert "node mx1 stopped" in server.log
    assert not node.config.admin.socket.exists()
    with node.open_store() as store:
        assert store.recovery is not None and store.recovery.torn_tail is None
        acct = store.index.account_by_address("alice@example.org")
        assert acct is not None and acct.quota_bytes == 2 * 2**30
        assert PasswordHasher().verify(acct.password_hash, "pw1")
    assert "result: OK" in node.ok("store", "fsck")


def test_sigint_stops_cleanly_too(node: NodeDir, serve: list[Server]) -> None:
    server = start(serve, node)
    node.ok("domain", "add", "example.org")
    assert server.terminate(signal.SIGINT) == 0
    assert "Traceback" not in server.log
    with node.open_store() as store:
        assert store.index.domains == {"example.org"}


def test_second_serve_on_the_same_data_dir_fails(node: NodeDir, serve: list[Server]) -> None:
    first = start(serve, node)
    result = node.run("serve")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("mailharbor: error: cannot serve: data directory")
    assert f"in use by another process (pid {first.proc.pid})" in last
    assert "waiting up to" not in result.stderr  # a running node holds it: no point waiting
    # The first node is unharmed and still owns its socket.
    node.ok("domain", "add", "example.org")
    assert 'domain.add name="example.org"' in first.log


#: Holds a data directory's lock the way an offline CLI command does (Store.open), for argv[3]
#: seconds after printing "locked".
HOLD_LOCK = """
import sys, time
from mailharbor.store import Store
st = Store.open(sys.argv[1], node_id=bytes.fromhex(sys.argv[2]))
print("locked", flush=True)
time.sleep(float(sys.argv[3]))
st.close()
"""


def test_serve_waits_for_an_offline_command_holding_the_lock(
    node: NodeDir, serve: list[Server]
) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(node.data_dir), node.config.node.node_id.hex(), "2"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        server = start(serve, node)  # starts while the lock is held; waits instead of failing
        waited = time.monotonic() - t0
        assert holder.wait(10) == 0
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
    assert f"in use by another process (pid {holder.pid}); waiting up to" in server.log
    print(f"serve waited {waited:.2f} s for the lock")
    assert waited >= 1.0
    node.ok("domain", "add", "example.org")
    assert 'domain.add name="example.org"' in server.log
    # Held for longer than the node waits: it gives up with the one-line error.
    assert server.terminate() == 0
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(node.data_dir), node.config.node.node_id.hex(), "30"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        result = node.run("serve")
        assert result.returncode == 1, result.stderr
        assert time.monotonic() - t0 >= 4.5
        last = result.stderr.splitlines()[-1]
        assert last.startswith("mailharbor: error: cannot serve: data directory"), last
        assert f"in use by another process (pid {holder.pid})" in last
    finally:
        holder.kill()
        holder.wait(10)


def test_killed_node_leaves_nothing_that_blocks(node: NodeDir, serve: list[Server]) -> None:
    server = start(serve, node)
    node.ok("domain", "add", "example.org")
    server.proc.kill()
    server.proc.wait(10)
    assert node.config.admin.socket.exists()  # stale socket left behind
    node.ok("domain", "add", "example.net")  # direct again: the kernel released the lock
    again = start(serve, node)  # replaces the stale socket
    assert "listening on" in again.log
    assert [d["name"] for d in node.json("domain", "list")] == ["example.net", "example.org"]


def test_locked_data_dir_without_a_socket_is_reported(node: NodeDir) -> None:
    with node.open_store():  # this process holds the lock, and answers on no socket
        t0 = time.monotonic()
        line = assert_one_line_error(node.run("domain", "add", "example.org"))
        assert time.monotonic() - t0 < 30
        assert f"data directory {node.data_dir} is in use by another process" in line
        assert "no node answers on its admin socket" in line and "nothing was changed" in line
        line = assert_one_line_error(node.run("store", "fsck"))
        assert "in use by another process" in line and "exclusive access" in line
    assert node.ok("domain", "list").strip() == "no domains"


def run_on_terminal(args: list[str], answers: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run ``mailharbor ARGS`` on a fresh pseudo-terminal (its controlling terminal, so getpass
    prompts there); type each answer after the next prompt. Returns (exit status, output)."""
    pid, fd = pty.fork()
    if pid == 0:  # child
        try:
            os.execv(str(MAILHARBOR), [str(MAILHARBOR), *args])
        finally:
            os._exit(127)
    out = b""
    pending = list(answers)
    answered = 0
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
                # getpass turns echo off (flushing typed-ahead input), then prompts.
                if pending and out[answered:].strip().endswith(b":"):
                    os.write(fd, pending.pop(0).encode() + b"\n")
                    answered = len(out)
        else:
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode("utf-8", "replace")


def test_account_add_prompts_twice_on_a_terminal(node: NodeDir) -> None:
    node.ok("domain", "add", "example.org")
    config = ["--config", str(node.config_path)]
    code, out = run_on_terminal(["account", "add", "a@example.org", *config], ["one", "two"])
    assert code == 1 and "the passwords do not match" in out, out
    code, out = run_on_terminal(["account", "add", "a@example.org", *config], ["tty pw"] * 2)
    assert code == 0, out
    assert "Password for a@example.org:" in out and "Retype the password:" in out
    assert "tty pw" not in out  # not echoed
    code, out = run_on_terminal(["account", "passwd", "a@example.org", *config], ["new pw"] * 2)
    assert code == 0 and "password of a@example.org changed" in out, out
    with node.open_store() as store:
        acct = store.index.account_by_address("a@example.org")
        assert acct is not None and PasswordHasher().verify(acct.password_hash, "new pw")


def test_a_torn_tail_is_reported_once(node: NodeDir, serve: list[Server]) -> None:
    node.ok("domain", "add", "example.org")
    segment = sorted((node.data_dir / "log").iterdir())[-1]

    def tear() -> None:
        with open(segment, "ab") as f:
            f.write(b"half a transaction" * 5)

    tear()
    result = node.run("domain", "list")
    assert result.returncode == 0 and "example.org" in result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mailharbor: warning: "), result.stderr
    assert "torn" in lines[0]
    assert node.run("domain", "list").stderr == ""  # dropped for good

    tear()
    server = start(serve, node)
    status = node.json("status")
    assert status["recovery"]["torn_tail"]["bytes_dropped"] == 90
    assert "torn tail of 90 bytes dropped" in server.log
