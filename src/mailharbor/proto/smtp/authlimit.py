"""Per-client-address AUTH failure accounting: a pure helper for the adapter.

Invariants:

- Pure and deterministic: time comes from the injected ``clock`` (seconds, monotonic); no I/O.
- Memory is bounded: at most ``max_addresses`` entries; the least recently touched is evicted.
- Failures older than ``window`` seconds are forgotten; a success clears the address.
- ``delay(addr)`` is ``0`` for an address with no recent failure, then ``base_delay`` doubling
  per failure up to ``max_delay``. ``locked_out(addr)`` is true for ``lockout`` seconds after the
  ``lockout_threshold``-th failure in the window; the adapter then answers AUTH with
  ``454 4.7.0`` (or drops the connection) without checking the password.
- IPv6 clients are counted per /64 and IPv4-mapped addresses as IPv4 (:func:`address_key`),
  so one host cannot dodge the count by rotating addresses within its own subnet.
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["AuthFailures", "address_key"]


@functools.lru_cache(maxsize=4096)
def address_key(address: str) -> str:
    """The counting key for a client address: IPv4 as is, IPv6 as its /64, other text as is.
    (Cached: it runs for every connection's limit slot, taken and given back.)"""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


@dataclass
class _Entry:
    failures: int
    first: float
    last: float
    locked_until: float


class AuthFailures:
    """Counts AUTH failures per client address and computes the delay and lockout.

    Defaults: ``base_delay`` 1 s, ``max_delay`` 30 s, ``window`` 3600 s, ``lockout_threshold``
    10 failures, ``lockout`` 900 s, ``max_addresses`` 100 000.
    """

    def __init__(
        self,
        clock: Callable[[], float],
        *,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        window: float = 3600.0,
        lockout_threshold: int = 10,
        lockout: float = 900.0,
        max_addresses: int = 100_000,
    ) -> None:
        if max_addresses < 1 or lockout_threshold < 1:
            raise ValueError("max_addresses and lockout_threshold must be positive")
        self._clock = clock
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.window = window
        self.lockout_threshold = lockout_threshold
        self.lockout = lockout
        self.max_addresses = max_addresses
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def _get(self, address: str) -> _Entry | None:
        key = address_key(address)
        entry = self._entries.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now - entry.last > self.window and now >= entry.locked_until:
            del self._entries[key]
            return None
        return entry

    def record_failure(self, address: str) -> None:
        now = self._clock()
        key = address_key(address)
        entry = self._get(address)
        if entry is None:
            entry = _Entry(0, now, now, 0.0)
        entry.failures += 1
        entry.last = now
        if entry.failures >= self.lockout_threshold:
            entry.locked_until = now + self.lockout
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_addresses:
            self._entries.popitem(last=False)

    def record_success(self, address: str) -> None:
        self._entries.pop(address_key(address), None)

    def failures(self, address: str) -> int:
        entry = self._get(address)
        return 0 if entry is None else entry.failures

    def delay(self, address: str) -> float:
        """Seconds to wait before answering this address's next AUTH."""
        n = self.failures(address)
        if n == 0:
            return 0.0
        return float(min(self.max_delay, self.base_delay * 2.0 ** min(n - 1, 62)))

    def locked_out(self, address: str) -> bool:
        entry = self._get(address)
        return entry is not None and self._clock() < entry.locked_until
