"""A real ``mailharbor serve`` process for integration tests with external clients.

`ServeNode` runs ``mailharbor init`` in a fresh directory, sets config keys per section (e.g.
``{"imap": {"listen": ["127.0.0.1:PORT"]}}``), adds domains and accounts through the CLI, starts
``mailharbor serve`` and waits until every configured TCP port accepts. ``stop()`` sends SIGTERM
(SIGKILL after a timeout); ``kill()`` sends SIGKILL. The daemon's log is kept in a file and shown
when start-up fails.
"""

from __future__ import annotations

import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

MAILHARBOR = Path(sys.executable).parent / "mailharbor"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _toml(value: Any) -> str:
    return json.dumps(value)  # strings, numbers, booleans and lists of them are TOML too


class ServeNode:
    """A node directory and, while started, its ``mailharbor serve`` process."""

    def __init__(self, prefix: str, settings: dict[str, dict[str, Any]]) -> None:
        self.base = Path(tempfile.mkdtemp(prefix=prefix + "-"))
        self.root = self.base / "node"
        self.config = self.root / "mailharbor.toml"
        self.cli("init", str(self.root), "--hostname", "mail.example.org", config=False)
        text = self.config.read_text()
        for section, keys in settings.items():
            header = f"\n[{section}]\n"
            assert text.count(header) == 1, f"no single [{section}] in the template"
            lines = "".join(f"{k} = {_toml(v)}\n" for k, v in keys.items())
            text = text.replace(header, header + lines)
        self.config.write_text(text)
        self.ports = [
            int(v.rsplit(":", 1)[1])
            for keys in settings.values()
            for vs in keys.values()
            if isinstance(vs, list)
            for v in vs
            if isinstance(v, str) and v.startswith("127.0.0.1:")
        ]
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = self.root / "serve.log"
        self._log: IO[bytes] | None = None

    def cli(self, *args: str, stdin: str | None = None, config: bool = True) -> str:
        cmd = [str(MAILHARBOR), *args, *(["--config", str(self.config)] if config else [])]
        r = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, f"{args}: {r.stderr}"
        return r.stdout

    def add_account(self, address: str, password: str) -> None:
        self.cli("account", "add", address, "--password-stdin", stdin=password + "\n")

    def start(self, timeout: float = 30, *, wait_ports: bool = True) -> None:
        """Start ``mailharbor serve``; wait until every configured port accepts (or, with
        ``wait_ports=False`` — a replication secondary serves no port — until its admin socket
        answers ``status``)."""
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [str(MAILHARBOR), "serve", "--config", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        if not wait_ports:
            self.wait_admin(deadline)
            return
        waiting = list(self.ports)
        while waiting:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{self.log}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"ports {waiting} not listening:\n{self.log}")
            try:
                socket.create_connection(("127.0.0.1", waiting[0]), 1).close()
                waiting.pop(0)
            except OSError:
                time.sleep(0.05)

    def wait_admin(self, deadline: float) -> None:
        """Wait until the running node answers ``status`` on its admin socket."""
        assert self.proc is not None
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"serve exited:\n{self.log}")
            r = subprocess.run(
                [str(MAILHARBOR), "status", "--config", str(self.config)],
                capture_output=True,
                text=True,
                timeout=30,
            )
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"admin socket not answering:\n{self.log}")
            time.sleep(0.1)

    def try_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run a CLI command with this node's config; the result, whatever the exit status."""
        cmd = [str(MAILHARBOR), *args, "--config", str(self.config)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    @property
    def log(self) -> str:
        return self.log_path.read_text("utf-8", "replace") if self.log_path.exists() else ""

    def _reap(self, sig: signal.Signals, timeout: float) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, timeout: float = 30) -> None:
        self._reap(signal.SIGTERM, timeout)

    def kill(self) -> None:
        self._reap(signal.SIGKILL, 10)

    def cleanup(self) -> None:
        self.kill()
        shutil.rmtree(self.base, ignore_errors=True)
