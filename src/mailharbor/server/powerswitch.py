"""A fake power switch for tests and demos: "powers off" (SIGKILL) or freezes (SIGSTOP) node
processes it was told about. **Never for production**: it kills whatever pid is registered.

Theory of operation
-------------------
A TCP server on loopback speaking one line per request, one line per answer:

=======================  ===================================================================
request                  answer
=======================  ===================================================================
``REGISTER name pid``    ``OK`` — outlet ``name`` powers process ``pid``
``OFF name``             ``OFF`` once the process is gone (SIGKILL, then waits until it is a
                         zombie or reaped, at most 5 s), ``ERR ...`` otherwise
``STOP name``/``CONT``   ``OK`` after SIGSTOP / SIGCONT (a frozen, not a dead, node)
``STATUS name``          ``ON`` or ``OFF``
``FAIL name on|off``     ``OK``; while on, ``OFF name`` answers ``ERR simulated failure`` (the
                         "fencing fails" scenario)
=======================  ===================================================================

The cluster's ``power-switch`` STONITH agent (:class:`mailharbor.server.cluster.
PowerSwitchAgent`) sends ``OFF <peer_name>`` and counts only ``OFF`` as fenced.

Run: ``python -m mailharbor.server.powerswitch 127.0.0.1:PORT``.

Invariants: only registered pids are signalled; ``OFF`` is answered only after the process
can no longer run (gone, or a zombie).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time

from mailharbor.server.listener import split_endpoint

__all__ = ["PowerSwitch", "main"]


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class PowerSwitch:
    def __init__(self) -> None:
        self.outlets: dict[str, int] = {}
        self.failing: set[str] = set()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError, ValueError):
            while line := await reader.readline():
                writer.write(
                    (await self.answer(line.decode("ascii", "replace").split())).encode() + b"\n"
                )
                await writer.drain()
        writer.close()

    async def answer(self, words: list[str]) -> str:
        if len(words) == 3 and words[0] == "REGISTER" and words[2].isdigit():
            self.outlets[words[1]] = int(words[2])
            return "OK"
        if len(words) == 3 and words[0] == "FAIL":
            (self.failing.add if words[2] == "on" else self.failing.discard)(words[1])
            return "OK"
        if len(words) != 2 or words[1] not in self.outlets:
            return "ERR unknown request or outlet"
        verb, pid = words[0], self.outlets[words[1]]
        if verb == "STATUS":
            return "ON" if _alive(pid) else "OFF"
        if verb in ("STOP", "CONT"):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP if verb == "STOP" else signal.SIGCONT)
            return "OK"
        if verb == "OFF":
            if words[1] in self.failing:
                return "ERR simulated failure"
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5
            while _alive(pid):
                if time.monotonic() > deadline:
                    return "ERR still running"
                await asyncio.sleep(0.01)
            return "OFF"
        return "ERR unknown request"


async def serve(endpoint: str) -> None:
    host, port = split_endpoint(endpoint)
    server = await asyncio.start_server(PowerSwitch().handle, host or "127.0.0.1", port)
    print(f"power switch listening on {endpoint}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m mailharbor.server.powerswitch HOST:PORT", file=sys.stderr)
        return 2
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
