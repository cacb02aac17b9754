"""DESIGN.md's layering rules, checked on the source with ``ast``.

Every module under src/mailharbor is parsed (nothing is imported) and its imports are checked
against ``RULES``. All imports count: inside functions, under ``if TYPE_CHECKING:``, and
``importlib.import_module("...")`` / ``__import__("...")`` with a literal name. ``from a import b``
counts as importing both ``a`` and ``a.b`` (``b`` may be a module).

To extend: add a :class:`Rule` row for a new layer, or a module to a rule's ``exempt`` with a
comment saying why. Packages that do not exist yet are simply not checked.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
PACKAGE = "mailharbor"


@dataclass(frozen=True)
class Rule:
    """Modules within ``scope`` (a module or package name) must not import ``forbid``.

    ``stdlib_only`` additionally limits them to the standard library plus ``allow``. A module
    within one of ``exempt`` is not bound by the rule. ``why`` is shown on a violation.
    """

    scope: str
    why: str
    forbid: tuple[str, ...] = ()
    stdlib_only: bool = False
    allow: tuple[str, ...] = ()
    exempt: tuple[str, ...] = ()


def _mh(*names: str) -> tuple[str, ...]:
    return tuple(f"{PACKAGE}.{n}" for n in names)


#: I/O that a sans-IO engine must not touch: it gets bytes and an injected clock.
SANS_IO = ("asyncio", "socket", "ssl", "selectors", "time")
#: Network access, which the store must not know about.
NETWORK = (
    "socket",
    "ssl",
    "selectors",
    "socketserver",
    "http",
    "urllib.request",
    "smtplib",
    "imaplib",
    "poplib",
    "ftplib",
    "telnetlib",
    "xmlrpc",
    "asyncio.streams",
    "asyncio.open_connection",
    "asyncio.start_server",
    "asyncio.open_unix_connection",
    "asyncio.start_unix_server",
    "asyncio.StreamReader",
    "asyncio.StreamWriter",
)

RULES: tuple[Rule, ...] = (
    Rule(
        f"{PACKAGE}.proto",
        "proto/ engines are sans-IO and import only the standard library and proto/",
        forbid=SANS_IO,
        stdlib_only=True,
        allow=_mh("proto"),
    ),
    Rule(
        f"{PACKAGE}.store",
        "store/ knows nothing of protocols, replication, the cluster or the network",
        forbid=_mh("proto", "server", "service", "repl", "cluster", "cli", "admin", "node")
        + NETWORK,
    ),
    Rule(
        f"{PACKAGE}.repl",
        "repl/ is a sans-IO protocol (standard library, crc32c, cryptography's AES-GCM for the "
        "message tags, repl/ only): sockets live in "
        "server/, time is injected, frames are opaque bytes (no store imports)",
        forbid=SANS_IO + _mh("server", "service", "proto", "store", "cli", "admin", "node"),
        stdlib_only=True,
        allow=("crc32c", "cryptography", *_mh("repl")),
    ),
    Rule(
        f"{PACKAGE}.cluster",
        "cluster/ is sans-IO (heartbeat, witness, decisions in virtual time): standard library "
        "(hashlib/hmac for the MACs), cluster/ and repl.state's names only; time and its "
        "collaborators are injected",
        forbid=SANS_IO + _mh("server", "service", "proto", "store", "cli", "admin", "node"),
        stdlib_only=True,
        allow=_mh("cluster", "repl.state"),
    ),
    Rule(
        f"{PACKAGE}.service",
        "service/ sits below the adapters and the CLI",
        forbid=_mh("server", "cli", "admin", "node"),
    ),
    Rule(
        f"{PACKAGE}.server",
        "server/ adapters are wired by node.py, not by the CLI or admin",
        forbid=_mh("cli", "admin", "node"),
    ),
    Rule(
        f"{PACKAGE}.config",
        "config.py is imported by every layer, so it imports none (standard library only; "
        "cluster.timing, itself standard library only, checks the [cluster] timings)",
        stdlib_only=True,
        allow=_mh("cluster.timing"),
    ),
    Rule(
        PACKAGE,
        "only the CLI and the admin interface build a node",
        forbid=_mh("node"),
        exempt=_mh("node", "cli", "admin", "__main__"),
    ),
)

#: Only these modules may import from both server/ and store/: the one place that wires layers.
WIRING_MODULES = _mh("node")

#: DESIGN.md: one module is the only caller of os.fsync, os.replace and directory fsync.
FSYNC_CALLS = ("fsync", "fdatasync", "replace", "sync")
FSYNC_OWNERS = _mh("store.fsio")
#: Temporary exemptions from the fsync rule, each to be removed when its reason goes away.
FSYNC_TEMPORARY: dict[str, str] = {}

STDLIB = frozenset(sys.stdlib_module_names)


def within(module: str, prefix: str) -> bool:
    """True if ``module`` is ``prefix`` or inside it (``a.b.c`` is within ``a.b``)."""
    return module == prefix or module.startswith(prefix + ".")


@dataclass(frozen=True)
class Import:
    module: str  # absolute dotted name
    line: int


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(tree: ast.AST, module: str, is_package: bool) -> Iterator[Import]:
    """Every module ``tree`` (the source of ``module``) imports, with relative ones resolved."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            yield Import(target, node.lineno)
            for alias in node.names:
                if alias.name != "*":
                    yield Import(f"{target}.{alias.name}", node.lineno)
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "__import__")
                or (isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
            )
        ):
            yield Import(node.args[0].value, node.lineno)


def fsync_calls(tree: ast.AST) -> Iterator[tuple[str, int]]:
    """Uses of os.fsync-like functions: ``os.fsync(...)`` or ``from os import fsync``."""
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "os"
            and node.attr in FSYNC_CALLS
        ):
            yield f"os.{node.attr}", node.lineno
        elif isinstance(node, ast.ImportFrom) and node.module == "os" and not node.level:
            for alias in node.names:
                if alias.name in FSYNC_CALLS:
                    yield f"os.{alias.name}", node.lineno


def violations(source: str, module: str, is_package: bool = False, filename: str = "") -> list[str]:
    """The rule violations in ``source``, the text of ``module``; empty when it is clean."""
    where = filename or module
    tree = ast.parse(source, filename=where)
    found = list(imports_of(tree, module, is_package))
    out: list[str] = []
    for rule in RULES:
        if not within(module, rule.scope) or any(within(module, e) for e in rule.exempt):
            continue
        for imp in found:
            if within(imp.module, module):
                continue  # a package importing its own submodules
            bad = next((f for f in rule.forbid if within(imp.module, f)), None)
            if bad is not None:
                out.append(f"{where}:{imp.line}: imports {imp.module} ({rule.why})")
            elif rule.stdlib_only:
                top = imp.module.partition(".")[0]
                allowed = top in STDLIB or any(within(imp.module, a) for a in rule.allow)
                if not allowed:
                    out.append(f"{where}:{imp.line}: imports {imp.module} ({rule.why})")
    # server/ modules may use store/ types; any other module importing both is wiring.
    if module not in WIRING_MODULES:
        server = [i for i in found if within(i.module, f"{PACKAGE}.server")]
        store = [i for i in found if within(i.module, f"{PACKAGE}.store")]
        if server and store and not within(module, f"{PACKAGE}.server"):
            out.append(
                f"{where}:{server[0].line}: imports both {server[0].module} and "
                f"{store[0].module} (only {', '.join(WIRING_MODULES)} wires server/ to store/)"
            )
    if not any(within(module, o) for o in FSYNC_OWNERS) and module not in FSYNC_TEMPORARY:
        for name, line in fsync_calls(tree):
            out.append(
                f"{where}:{line}: uses {name} (only {', '.join(FSYNC_OWNERS)} may fsync/replace)"
            )
    return sorted(set(out))


def _modules() -> list[Path]:
    root = SRC / PACKAGE
    return sorted(p for p in root.rglob("*.py") if "__pycache__" not in p.parts)


@pytest.mark.parametrize(
    "path", _modules(), ids=lambda p: module_name(p) if isinstance(p, Path) else str(p)
)
def test_module_follows_import_rules(path: Path) -> None:
    module = module_name(path)
    problems = violations(
        path.read_text("utf-8"),
        module,
        is_package=path.name == "__init__.py",
        filename=str(path.relative_to(SRC.parent)),
    )
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------
# The checker itself catches what it should: each rule, shown on a small made-up module.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("mailharbor.proto.smtp", "import asyncio\n"),
        ("mailharbor.proto.smtp", "def f():\n    import time\n"),
        ("mailharbor.proto.imap", "from mailharbor.store import log\n"),
        ("mailharbor.proto.imap", "import crc32c\n"),
        ("mailharbor.proto.imap", "from ..service import delivery\n"),
        ("mailharbor.store.log", "from ..proto import smtp\n"),
        ("mailharbor.store.log", "from asyncio import open_connection\n"),
        ("mailharbor.store.log", "import socket\n"),
        ("mailharbor.store.log", "import importlib\nimportlib.import_module('mailharbor.cli')\n"),
        ("mailharbor.repl.protocol", "import asyncio\n"),
        ("mailharbor.repl.session", "from mailharbor.store import Store\n"),
        ("mailharbor.repl.wire", "import time\n"),
        ("mailharbor.repl.wire", "import dnspython\n"),
        ("mailharbor.cluster.decide", "from time import monotonic\n"),
        (
            "mailharbor.cluster.decide",
            "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from mailharbor.store import Store\n",
        ),
        ("mailharbor.service.delivery", "from mailharbor.server import smtp\n"),
        (
            "mailharbor.admin.tool",
            "from mailharbor.server import x\nfrom mailharbor.store import y\n",
        ),
        ("mailharbor.service.queue", "from mailharbor.node import Node\n"),
        ("mailharbor.config", "import mailharbor.store\n"),
        ("mailharbor.store.segment", "import os\nos.fsync(3)\n"),
        ("mailharbor.service.x", "from os import replace\n"),
    ],
)
def test_checker_reports_violation(module: str, source: str) -> None:
    assert violations(source, module), f"{module} with {source!r} should be refused"


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("mailharbor.proto.smtp", "import re\nfrom dataclasses import dataclass\n"),
        ("mailharbor.proto.smtp", "from . import common\nfrom .common import Reply\n"),
        ("mailharbor.proto", "from mailharbor.proto import smtp\n"),
        ("mailharbor.store.log", "import asyncio\nimport crc32c\nfrom . import fsio\n"),
        ("mailharbor.store.fsio", "import os\nos.fsync(3)\nos.replace('a', 'b')\n"),
        ("mailharbor.node", "from mailharbor.server import x\nfrom mailharbor.store import y\n"),
        ("mailharbor.cli.serve_cmd", "from mailharbor.node import Node\n"),
        ("mailharbor.server.smtp", "import asyncio\nfrom mailharbor.proto import smtp\n"),
        ("mailharbor.service.delivery", "from mailharbor.store import Store\n"),
        ("mailharbor.repl.wire", "import crc32c\nimport hmac\nfrom .state import Role\n"),
    ],
)
def test_checker_accepts_allowed_import(module: str, source: str) -> None:
    assert violations(source, module) == []


def test_relative_imports_resolve_against_the_package() -> None:
    tree = ast.parse("from ..store import log\nfrom . import x\nfrom .y import z\n")
    got = {i.module for i in imports_of(tree, "mailharbor.service.delivery", False)}
    assert {"mailharbor.store.log", "mailharbor.service.x", "mailharbor.service.y.z"} <= got
    tree = ast.parse("from . import x\n")
    got = {i.module for i in imports_of(tree, "mailharbor.service", True)}
    assert "mailharbor.service.x" in got
