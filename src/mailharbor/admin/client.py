"""A blocking client for the admin socket, used by the CLI.

Contract: :meth:`AdminClient.request` sends one request on a fresh connection and returns the
node's :class:`~mailharbor.admin.protocol.Response`. It raises :class:`NodeNotRunning` when
nothing listens on the socket (no file, or a stale file nobody accepts on: the caller may then
open the store directly) and :class:`AdminClientError` (one-line message) for every other
failure: permission denied, timeout, the node closing the connection, a malformed answer.
"""

from __future__ import annotations

import itertools
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from mailharbor.admin.protocol import (
    COMMANDS,
    MAX_RESPONSE_BYTES,
    Request,
    RequestError,
    Response,
    ResponseError,
    decode_response,
    encode_request,
    validate_args,
)

__all__ = [
    "AdminClient",
    "AdminClientError",
    "NodeNotRunning",
    "make_request",
]

#: Seconds to wait for a connection.
CONNECT_TIMEOUT = 5.0
#: Seconds to wait for an answer to an ordinary command.
DEFAULT_TIMEOUT = 60.0
#: Seconds to wait for an answer to a ``slow`` command (compaction).
SLOW_TIMEOUT = 6 * 3600.0

_ids = itertools.count(1)


class NodeNotRunning(Exception):
    """Nothing accepts connections on the admin socket."""


class AdminClientError(Exception):
    """Talking to the node failed; ``str()`` is one line for the user."""


def make_request(cmd: str, args: Mapping[str, object] | None = None) -> Request:
    """A validated request with a fresh id. Raises RequestError like the server would."""
    return Request(next(_ids), cmd, validate_args(cmd, args or {}))


class AdminClient:
    """Talks to the node listening on the Unix socket ``path``."""

    def __init__(
        self,
        path: Path | str,
        *,
        connect_timeout: float = CONNECT_TIMEOUT,
        timeout: float = DEFAULT_TIMEOUT,
        slow_timeout: float = SLOW_TIMEOUT,
    ) -> None:
        self.path = Path(path)
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.slow_timeout = slow_timeout

    def _connect(self) -> socket.socket:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        s.settimeout(self.connect_timeout)
        try:
            s.connect(os.fspath(self.path))
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError):
            s.close()
            raise NodeNotRunning(f"no node answers on {self.path}") from None
        except PermissionError:
            s.close()
            raise AdminClientError(
                f"permission denied on the admin socket {self.path}: run this command as the "
                "user the node runs as"
            ) from None
        except TimeoutError:
            s.close()
            raise AdminClientError(
                f"the node did not accept a connection on {self.path} within "
                f"{self.connect_timeout:g} s"
            ) from None
        except OSError as e:
            s.close()
            raise AdminClientError(
                f"cannot connect to the admin socket {self.path}: {e.strerror or e}"
            ) from None
        return s

    def request(self, request: Request) -> Response:
        """Send ``request``; return the node's response (see the module doc for errors)."""
        spec = COMMANDS.get(request.cmd)
        timeout = self.slow_timeout if spec is not None and spec.slow else self.timeout
        s = self._connect()
        try:
            s.settimeout(timeout)
            try:
                s.sendall(encode_request(request))
                line = self._read_line(s)
            except TimeoutError:
                raise AdminClientError(
                    f"the node did not answer {request.cmd} within {timeout:g} s"
                ) from None
            except OSError as e:
                raise AdminClientError(
                    f"lost the connection to the node during {request.cmd}: {e.strerror or e}"
                ) from None
        finally:
            s.close()
        try:
            response = decode_response(line)
        except ResponseError as e:
            raise AdminClientError(str(e)) from None
        if response.id is not None and response.id != request.id:
            if not response.ok:  # a connection-level refusal (busy, stopping, permission)
                return Response(request.id, False, None, response.error)
            raise AdminClientError("the node answered another request")
        if response.id is None:
            return Response(request.id, response.ok, response.result, response.error)
        return response

    @staticmethod
    def _read_line(s: socket.socket) -> bytes:
        buf = bytearray()
        while True:
            chunk = s.recv(65536)
            if not chunk:
                raise AdminClientError(
                    "the node closed the connection without answering (is it stopping?)"
                )
            buf += chunk
            nl = buf.find(b"\n")
            if nl >= 0:
                return bytes(buf[: nl + 1])
            if len(buf) > MAX_RESPONSE_BYTES:
                raise AdminClientError(f"the node's answer is longer than {MAX_RESPONSE_BYTES}")

    def call(self, cmd: str, args: Mapping[str, object] | None = None) -> Response:
        """``request(make_request(cmd, args))``; RequestError for invalid arguments."""
        return self.request(make_request(cmd, args))

    def answers(self) -> bool:
        """True if a node answers ``status`` on the socket (never raises)."""
        try:
            return self.call("status").ok
        except (NodeNotRunning, AdminClientError, RequestError):
            return False
