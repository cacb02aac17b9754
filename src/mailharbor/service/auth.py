"""Password hashing and the authenticator.

Theory of operation
-------------------
Passwords are stored as argon2id PHC strings (``$argon2id$v=19$m=…,t=…,p=…$salt$hash``) made by
:func:`hash_password`. Argon2 is slow on purpose, and mail clients log in constantly (phones
reconnecting, IMAP clients opening ten connections at once) while attackers guess passwords in
floods, so :class:`Authenticator` puts three things between a login and argon2:

1. **A bounded pool.** Every argon2 verification runs in a worker thread, never on the event loop.
   At most ``max_concurrent_checks`` run at once (an ``asyncio.Semaphore`` for admission, plus a
   ``threading.BoundedSemaphore`` of the same size as the hard cap shared with
   :meth:`Authenticator.verify_blocking`). Checks beyond that wait in a queue of at most
   ``max_queued_checks``; a login that would overflow it gets ``TEMPFAIL`` ("too many concurrent
   authentications") at once instead of queueing without bound.
2. **Single flight and a success cache.** Logins are keyed by a keyed BLAKE2b digest (a random
   key per process) of (account, password, stored hash). Identical logins that arrive while one is
   being checked share that one check. A *successful* check is remembered for ``cache_seconds``
   (LRU-bounded to ``cache_size`` entries), so a re-login storm with the same correct credentials
   costs one argon2 verification per ``cache_seconds``. Failures are never cached. The account is
   looked up *before* the cache is consulted, and the stored hash is part of the key, so a changed
   password, a deleted or a disabled account takes effect on the very next login. The cache holds
   no password and no hash, only digests; for ``cache_seconds`` a digest is as easy to attack as a
   fast keyed hash for someone who can read this process's memory (key included) — the same
   trade-off as any auth cache, and the reason entries are short-lived.
3. **No account oracle.** Every outcome that depends on the account — unknown user, wrong
   password, a stored hash that is corrupt or absurdly expensive — costs one argon2 verification
   of comparable cost (unknown users and unusable hashes are checked against a dummy hash made at
   construction with the current parameters) and returns the same ``FAILED`` result. Input that is
   invalid whatever the account (malformed user name, empty or over-long password) is refused
   before the lookup, so its fast answer reveals nothing about accounts.

Invariants:

- ``verify`` and ``verify_blocking`` never raise for any input or stored data; argon2 and lookup
  errors are logged via :mod:`logging` and become ``FAILED`` (bad stored data) or ``TEMPFAIL``
  (lookup failure, executor failure). The ``reason`` in a result is a fixed string, never
  exception text, so it may go on the wire.
- ``OK`` is returned only after argon2 accepted the password against the hash the lookup returned,
  or from a cache entry made that way for the same (account, password, hash) less than
  ``cache_seconds`` ago on the injected clock.
- At most ``max_concurrent_checks`` argon2 computations run at any moment in this authenticator
  (dummy verifications included); admitted-but-unfinished checks never exceed
  ``max_concurrent_checks + max_queued_checks``.

User names: the domain part is case-insensitive (DNS). The local part is, by RFC 5321, the
receiving domain's business; like most mail servers mailharbor treats it case-insensitively and
otherwise keeps it *as given*: no dot removal, no ``+detail`` stripping, no Unicode normalisation.
The comparison key, and the canonical account address reported on ``OK``, is therefore
``local.lower() + "@" + domain.lower()`` (split at the last ``@``; a name without ``@`` is a bare
login name, lowercased). The store keys accounts by this form; a display spelling such as
``Alice.Smith@Example.org`` is the store's to keep. See :func:`canonical_account`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from functools import lru_cache

from argon2 import PasswordHasher, Type, extract_parameters
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

__all__ = [
    "DEFAULT_PARAMS",
    "FAST_TEST_PARAMS",
    "MAX_PASSWORD_BYTES",
    "MAX_USERNAME_LENGTH",
    "Argon2Params",
    "AuthResult",
    "AuthStats",
    "AuthStatus",
    "Authenticator",
    "canonical_account",
    "hash_password",
    "needs_rehash",
]

log = logging.getLogger(__name__)

#: Longest accepted user name in characters (RFC 5321: 64 local + "@" + 255 domain).
MAX_USERNAME_LENGTH = 320
#: Longest accepted password in UTF-8 bytes, both when hashing and when verifying.
MAX_PASSWORD_BYTES = 1024

# Stored hashes whose cost exceeds these are treated as unusable (FAILED, logged) instead of
# verified: a corrupt or hostile record must not make one login allocate gigabytes or spin for
# minutes. They are far above any sensible setting (OWASP: 19 MiB, t=2, p=1).
_MAX_STORED_MEMORY_KIB = 1024 * 1024  # 1 GiB
_MAX_STORED_TIME_COST = 32
_MAX_STORED_PARALLELISM = 64

_PASSWORD_ERRORS = "surrogateescape"  # round-trips bytes a protocol layer decoded the same way


# --------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Argon2Params:
    """Argon2id cost parameters for new hashes.

    The defaults are OWASP's recommended minimum for argon2id: 19 MiB of memory, two passes, one
    lane — tens of milliseconds per check on a server core, which bounds a guessing flood without
    making a login storm unbearable (the :class:`Authenticator` cache absorbs the storm).
    """

    time_cost: int = 2
    """Number of passes over memory (argon2 ``t``)."""
    memory_cost_kib: int = 19 * 1024
    """Memory in KiB (argon2 ``m``); at least ``8 * parallelism``."""
    parallelism: int = 1
    """Lanes (argon2 ``p``)."""
    hash_len: int = 32
    """Length of the derived key in bytes."""
    salt_len: int = 16
    """Length of the random salt in bytes."""

    def __post_init__(self) -> None:
        if self.time_cost < 1:
            raise ValueError("time_cost must be >= 1")
        if self.parallelism < 1:
            raise ValueError("parallelism must be >= 1")
        if self.memory_cost_kib < 8 * self.parallelism:
            raise ValueError("memory_cost_kib must be >= 8 * parallelism")
        if self.hash_len < 16:
            raise ValueError("hash_len must be >= 16")
        if self.salt_len < 8:
            raise ValueError("salt_len must be >= 8")


#: Parameters used when none are given.
DEFAULT_PARAMS = Argon2Params()
#: Cheapest parameters argon2 allows; for tests only, never for stored accounts.
FAST_TEST_PARAMS = Argon2Params(time_cost=1, memory_cost_kib=8, parallelism=1)


@lru_cache(maxsize=16)
def _hasher_for(params: Argon2Params) -> PasswordHasher:
    return PasswordHasher(
        time_cost=params.time_cost,
        memory_cost=params.memory_cost_kib,
        parallelism=params.parallelism,
        hash_len=params.hash_len,
        salt_len=params.salt_len,
        type=Type.ID,
    )


def _encode_password(password: str) -> bytes:
    """UTF-8 bytes of *password*; lone surrogates from ``surrogateescape`` decoding map back."""
    return password.encode("utf-8", _PASSWORD_ERRORS)


def hash_password(password: str, *, params: Argon2Params | None = None) -> str:
    """Return an argon2id PHC string for *password* with a fresh random salt.

    *params* defaults to :data:`DEFAULT_PARAMS`. Raises ``ValueError`` for an empty password,
    one longer than :data:`MAX_PASSWORD_BYTES` in UTF-8, or one that cannot be encoded (a lone
    surrogate not produced by ``surrogateescape``): such a password could never log in.
    """
    if not password:
        raise ValueError("password must not be empty")
    try:
        secret = _encode_password(password)
    except UnicodeEncodeError:
        raise ValueError("password is not encodable as UTF-8") from None
    if len(secret) > MAX_PASSWORD_BYTES:
        raise ValueError(f"password longer than {MAX_PASSWORD_BYTES} bytes")
    return _hasher_for(params or DEFAULT_PARAMS).hash(secret)


def needs_rehash(hash: str, *, params: Argon2Params | None = None) -> bool:
    """Whether *hash* should be replaced by a fresh :func:`hash_password` of the same password.

    True when *hash* is not an argon2id hash made with exactly *params* (default
    :data:`DEFAULT_PARAMS`): other type, version, cost, salt or output length — and also when it
    cannot be parsed at all. Call it after a successful login, when the password is known.
    """
    try:
        return _hasher_for(params or DEFAULT_PARAMS).check_needs_rehash(hash)
    except (InvalidHashError, ValueError):
        return True


def _hasher_needs_rehash(hasher: PasswordHasher, hash: str) -> bool:
    try:
        return hasher.check_needs_rehash(hash)
    except (InvalidHashError, ValueError):
        return True


def _check_stored_cost(hash: str) -> None:
    """Raise ``InvalidHashError`` unless *hash* parses and its cost is within the sanity caps."""
    params = extract_parameters(hash)
    if (
        params.memory_cost > _MAX_STORED_MEMORY_KIB
        or params.time_cost > _MAX_STORED_TIME_COST
        or params.parallelism > _MAX_STORED_PARALLELISM
    ):
        raise InvalidHashError("stored hash cost above the sanity caps")


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


class AuthStatus(Enum):
    """Outcome of an authentication."""

    OK = "ok"
    """The password is correct; ``AuthResult.account`` names the account."""
    FAILED = "failed"
    """Wrong user, wrong password or unusable stored hash — deliberately indistinguishable."""
    TEMPFAIL = "tempfail"
    """Not decided: the server is overloaded or the account database is unavailable; retry."""


_REASON_OK = "authenticated"
_REASON_FAILED = "authentication failed"
_REASON_BUSY = "too many concurrent authentications"
_REASON_UNAVAILABLE = "authentication temporarily unavailable"


@dataclass(frozen=True)
class AuthResult:
    """The answer of :class:`Authenticator`.

    ``account`` is the canonical account address (see :func:`canonical_account`) exactly when
    ``status`` is OK. ``reason`` is a fixed, human-readable string safe to send to a client; it
    never contains exception text. ``needs_rehash`` (OK only) tells the caller the stored hash
    uses outdated parameters and should be replaced with :func:`hash_password` of the password
    that just worked.
    """

    status: AuthStatus
    account: str | None = None
    reason: str = ""
    needs_rehash: bool = False

    def __post_init__(self) -> None:
        if (self.status is AuthStatus.OK) != (self.account is not None):
            raise ValueError("account is set exactly when status is OK")

    @property
    def ok(self) -> bool:
        """True when the login succeeded."""
        return self.status is AuthStatus.OK

    @classmethod
    def success(cls, account: str, *, needs_rehash: bool = False) -> AuthResult:
        """An OK result for *account*."""
        return cls(AuthStatus.OK, account, _REASON_OK, needs_rehash)

    @classmethod
    def failed(cls) -> AuthResult:
        """The one FAILED result (identical for every cause)."""
        return _FAILED

    @classmethod
    def tempfail(cls, reason: str) -> AuthResult:
        """A TEMPFAIL result; *reason* must be a fixed string, never exception text."""
        return cls(AuthStatus.TEMPFAIL, None, reason)


_FAILED = AuthResult(AuthStatus.FAILED, None, _REASON_FAILED)
_BUSY = AuthResult(AuthStatus.TEMPFAIL, None, _REASON_BUSY)
_UNAVAILABLE = AuthResult(AuthStatus.TEMPFAIL, None, _REASON_UNAVAILABLE)


@dataclass(frozen=True)
class AuthStats:
    """Counters since the authenticator was built (for ``admin`` and benchmarks)."""

    argon2_checks: int
    """Argon2 verifications performed, dummy ones included."""
    cache_hits: int
    """Logins answered OK from the success cache."""
    shared: int
    """Logins that joined an identical check already in flight."""
    refused_busy: int
    """Logins answered TEMPFAIL because the queue was full."""


# --------------------------------------------------------------------------------------------
# User names
# --------------------------------------------------------------------------------------------


def canonical_account(username: str, *, max_length: int = MAX_USERNAME_LENGTH) -> str | None:
    """The comparison key and canonical address for *username*, or None if it is malformed.

    ``local@domain`` becomes ``local.lower() + "@" + domain.lower()``, split at the last ``@``
    (a quoted local part may contain ``@``); a name without ``@`` is a bare login name and is
    lowercased. Nothing else is rewritten (no dot or ``+detail`` folding, no Unicode
    normalisation). Malformed: empty, longer than *max_length* characters, containing whitespace
    or control characters, not encodable as UTF-8, or with an empty local or domain part.
    """
    if not username or len(username) > max_length:
        return None
    if any(ch.isspace() or ord(ch) < 0x20 or 0x7F <= ord(ch) < 0xA0 for ch in username):
        return None
    try:
        username.encode("utf-8")
    except UnicodeEncodeError:
        return None
    local, at, domain = username.rpartition("@")
    if not at:
        return username.lower()
    if not local or not domain:
        return None
    return f"{local.lower()}@{domain.lower()}"


# --------------------------------------------------------------------------------------------
# The authenticator
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Flight:
    """One argon2 check in flight, shared by every identical login waiting for it."""

    digest: bytes
    task: asyncio.Task[AuthResult] | None = None
    waiters: int = 0
    started: bool = False  # holds an admission slot; from here on it runs to completion


@dataclass(eq=False)
class _LoopState:
    """Per-event-loop state: asyncio primitives bind to the loop that first uses them."""

    loop: asyncio.AbstractEventLoop
    semaphore: asyncio.Semaphore
    flights: dict[bytes, _Flight] = field(default_factory=dict)
    admitted: int = 0  # checks created and not yet finished: running + queued


class Authenticator:
    """Verifies user name and password against stored argon2 hashes; see the module docstring.

    ``lookup(account)`` receives the canonical account (see :func:`canonical_account`) and
    returns the stored PHC hash, or None if there is no such account or it may not log in. It is
    called on the caller's thread — the event loop for :meth:`verify` — so it must be fast and
    non-blocking (the store serves it from its in-memory account index). If it raises, the login
    gets TEMPFAIL.

    Abuse limits (constructor arguments, with defaults):

    - ``max_concurrent_checks``: argon2 checks running at once; default ``2 * os.cpu_count()``.
    - ``max_queued_checks``: checks waiting for a slot beyond those; default
      ``8 * max_concurrent_checks``. Beyond it a login gets TEMPFAIL at once.
    - ``cache_seconds`` (default 60; 0 disables) and ``cache_size`` (default 10,000 entries, LRU):
      the success cache.
    - ``max_username_length`` (default :data:`MAX_USERNAME_LENGTH`) and ``max_password_bytes``
      (default :data:`MAX_PASSWORD_BYTES`): longer input fails without a lookup.

    ``clock`` is a monotonic clock in seconds (default ``time.monotonic``); it only ages the
    cache. ``executor`` runs the argon2 checks; by default the authenticator owns a thread pool
    of ``max_concurrent_checks`` threads, released by :meth:`close`. ``params`` are the
    parameters of current hashes: they make the dummy hash for unknown users and decide
    ``AuthResult.needs_rehash``. ``hasher`` may replace ``params`` with a ready
    ``argon2.PasswordHasher`` (used by tests to observe the real verification).

    :meth:`verify` binds the authenticator to the running event loop; using it from a second
    loop while the first is still open raises ``RuntimeError`` (a programming error). Once that
    loop is closed, the next loop takes over.
    """

    def __init__(
        self,
        lookup: Callable[[str], str | None],
        *,
        max_concurrent_checks: int | None = None,
        max_queued_checks: int | None = None,
        cache_seconds: float = 60.0,
        cache_size: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
        executor: Executor | None = None,
        params: Argon2Params | None = None,
        hasher: PasswordHasher | None = None,
        max_username_length: int = MAX_USERNAME_LENGTH,
        max_password_bytes: int = MAX_PASSWORD_BYTES,
    ) -> None:
        if max_concurrent_checks is None:
            max_concurrent_checks = 2 * (os.cpu_count() or 1)
        if max_queued_checks is None:
            max_queued_checks = 8 * max_concurrent_checks
        if max_concurrent_checks < 1:
            raise ValueError("max_concurrent_checks must be >= 1")
        if max_queued_checks < 0:
            raise ValueError("max_queued_checks must be >= 0")
        if cache_seconds < 0:
            raise ValueError("cache_seconds must be >= 0")
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        if params is not None and hasher is not None:
            raise ValueError("give params or hasher, not both")

        self._lookup = lookup
        self._max_concurrent = max_concurrent_checks
        self._max_queued = max_queued_checks
        self._cache_seconds = float(cache_seconds)
        self._cache_size = cache_size
        self._clock = clock
        self._max_username_length = max_username_length
        self._max_password_bytes = max_password_bytes
        self._hasher = hasher if hasher is not None else _hasher_for(params or DEFAULT_PARAMS)

        self._executor = executor
        self._owns_executor = executor is None
        self._closed = False

        # Hard cap on argon2 computations across the async and blocking paths.
        self._hard_cap = threading.BoundedSemaphore(max_concurrent_checks)
        # Unknown users are verified against this: same parameters as new hashes, and a secret
        # nobody knows, so it never matches.
        self._dummy_hash = self._hasher.hash(secrets.token_bytes(32))
        self._cache_key = secrets.token_bytes(hashlib.blake2b.MAX_KEY_SIZE)

        self._lock = threading.Lock()  # guards the cache, the counters and executor creation
        self._cache: OrderedDict[bytes, tuple[float, AuthResult]] = OrderedDict()
        self._argon2_checks = 0
        self._cache_hits = 0
        self._shared = 0
        self._refused_busy = 0
        self._busy_unreported = 0
        self._busy_next_report = float("-inf")

        self._state: _LoopState | None = None

    # ---- public API ----------------------------------------------------------------------

    async def verify(self, username: str, password: str) -> AuthResult:
        """Check *password* for *username* without blocking the event loop.

        Returns OK (with the canonical account), FAILED, or TEMPFAIL (queue full, lookup
        failed). Never raises except ``CancelledError`` when the caller is cancelled; cancelling
        a login abandons a check that has not started yet, while a started one finishes in its
        thread (and, if it succeeded, still fills the cache).
        """
        prepared = self._prepare(username, password)
        if prepared is None:
            return _FAILED
        account, secret = prepared
        looked_up = self._do_lookup(account)
        if looked_up is _UNAVAILABLE:
            return _UNAVAILABLE
        stored = looked_up if isinstance(looked_up, str) else None
        digest = self._digest(account, secret, stored)
        if stored is not None:
            hit = self._cache_get(digest)
            if hit is not None:
                return hit

        state = self._loop_state()
        flight = state.flights.get(digest)
        if flight is None:
            if state.admitted >= self._max_concurrent + self._max_queued:
                self._note_busy(state.admitted)
                return _BUSY
            flight = self._launch(state, digest, account, stored, secret)
        else:
            with self._lock:
                self._shared += 1
        task = flight.task
        assert task is not None
        flight.waiters += 1
        try:
            return await asyncio.shield(task)
        finally:
            flight.waiters -= 1
            if flight.waiters == 0 and not flight.started and not task.done():
                # Nobody wants the answer and no argon2 work has begun: give the slot back.
                if state.flights.get(digest) is flight:
                    del state.flights[digest]
                task.cancel()

    def verify_blocking(self, username: str, password: str) -> AuthResult:
        """Like :meth:`verify`, but runs argon2 in the calling thread (for the CLI and tools).

        Shares the success cache and the hard cap on concurrent argon2 computations with
        :meth:`verify`, but neither its queue bound nor its single-flight: it waits for a free
        slot. Must not be called from a thread running an event loop (``RuntimeError``).
        """
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise RuntimeError("verify_blocking() called from a running event loop; use verify()")
        prepared = self._prepare(username, password)
        if prepared is None:
            return _FAILED
        account, secret = prepared
        looked_up = self._do_lookup(account)
        if looked_up is _UNAVAILABLE:
            return _UNAVAILABLE
        stored = looked_up if isinstance(looked_up, str) else None
        digest = self._digest(account, secret, stored)
        if stored is not None:
            hit = self._cache_get(digest)
            if hit is not None:
                return hit
        result = self._check(account, stored, secret)
        if result.ok:
            self._cache_put(digest, result)
        return result

    def stats(self) -> AuthStats:
        """A snapshot of the counters."""
        with self._lock:
            return AuthStats(
                argon2_checks=self._argon2_checks,
                cache_hits=self._cache_hits,
                shared=self._shared,
                refused_busy=self._refused_busy,
            )

    def clear_cache(self) -> None:
        """Forget every cached success (e.g. after an administrative password reset)."""
        with self._lock:
            self._cache.clear()

    def close(self) -> None:
        """Shut down the owned thread pool (an injected executor is left alone). Idempotent.

        Logins after ``close()`` that need an argon2 check get TEMPFAIL.
        """
        with self._lock:
            self._closed = True
            executor, self._executor = self._executor, None
        if self._owns_executor and executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    # ---- internals: input, lookup, cache --------------------------------------------------

    def _prepare(self, username: str, password: str) -> tuple[str, bytes] | None:
        """(canonical account, password bytes), or None for input that can never log in."""
        account = canonical_account(username, max_length=self._max_username_length)
        if account is None or not password:
            return None
        try:
            secret = _encode_password(password)
        except UnicodeEncodeError:
            return None
        if len(secret) > self._max_password_bytes:
            return None
        return account, secret

    def _do_lookup(self, account: str) -> str | AuthResult | None:
        """The stored hash, None for no account, or ``_UNAVAILABLE`` if the lookup failed."""
        try:
            stored = self._lookup(account)
        except Exception:
            log.exception("account lookup failed for %r", account)
            return _UNAVAILABLE
        if stored is not None and not isinstance(stored, str):
            log.error("account lookup for %r returned %s, not str", account, type(stored).__name__)
            return _UNAVAILABLE
        return stored

    def _digest(self, account: str, secret: bytes, stored: str | None) -> bytes:
        """Keyed BLAKE2b over length-prefixed (account, password, stored hash or 'none')."""
        h = hashlib.blake2b(key=self._cache_key, digest_size=32)
        stored_part = b"\x00" if stored is None else b"\x01" + stored.encode("utf-8", "replace")
        for part in (account.encode("utf-8"), secret, stored_part):
            h.update(len(part).to_bytes(8, "big"))
            h.update(part)
        return h.digest()

    def _cache_get(self, digest: bytes) -> AuthResult | None:
        if self._cache_seconds <= 0 or self._cache_size == 0:
            return None
        now = self._clock()
        with self._lock:
            entry = self._cache.get(digest)
            if entry is None:
                return None
            expires, result = entry
            if now >= expires:
                del self._cache[digest]
                return None
            self._cache.move_to_end(digest)
            self._cache_hits += 1
            return result

    def _cache_put(self, digest: bytes, result: AuthResult) -> None:
        if self._cache_seconds <= 0 or self._cache_size == 0:
            return
        expires = self._clock() + self._cache_seconds
        with self._lock:
            self._cache[digest] = (expires, result)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)

    def _note_busy(self, admitted: int) -> None:
        """Count a refused login; log at most one warning per 10 s of the clock."""
        now = self._clock()
        with self._lock:
            self._refused_busy += 1
            self._busy_unreported += 1
            if now < self._busy_next_report:
                return
            refused, self._busy_unreported = self._busy_unreported, 0
            self._busy_next_report = now + 10.0
        log.warning(
            "authentication queue full (%d checks admitted, limit %d running + %d queued); "
            "%d login(s) answered TEMPFAIL",
            admitted,
            self._max_concurrent,
            self._max_queued,
            refused,
        )

    # ---- internals: the async path --------------------------------------------------------

    def _loop_state(self) -> _LoopState:
        loop = asyncio.get_running_loop()
        state = self._state
        if state is None or (state.loop is not loop and state.loop.is_closed()):
            state = _LoopState(loop, asyncio.Semaphore(self._max_concurrent))
            self._state = state
        elif state.loop is not loop:
            raise RuntimeError("Authenticator is bound to another event loop that is still open")
        return state

    def _launch(
        self, state: _LoopState, digest: bytes, account: str, stored: str | None, secret: bytes
    ) -> _Flight:
        flight = _Flight(digest)
        task = state.loop.create_task(self._run_flight(state, flight, account, stored, secret))
        flight.task = task
        state.flights[digest] = flight
        state.admitted += 1

        def finished(_: asyncio.Task[AuthResult]) -> None:
            # A done callback, not a ``finally``: it also runs for a task cancelled before its
            # first step, whose coroutine body never started.
            state.admitted -= 1
            if state.flights.get(digest) is flight:
                del state.flights[digest]

        task.add_done_callback(finished)
        return flight

    async def _run_flight(
        self, state: _LoopState, flight: _Flight, account: str, stored: str | None, secret: bytes
    ) -> AuthResult:
        async with state.semaphore:
            flight.started = True
            try:
                executor = self._get_executor()
                result = await state.loop.run_in_executor(
                    executor, self._check, account, stored, secret
                )
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("could not run an argon2 check")
                return _UNAVAILABLE
        if result.ok:
            self._cache_put(flight.digest, result)
        return result

    def _get_executor(self) -> Executor:
        with self._lock:
            if self._closed:
                raise RuntimeError("authenticator is closed")
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self._max_concurrent, thread_name_prefix="mailharbor-auth"
                )
            return self._executor

    # ---- internals: the argon2 check (worker thread or CLI thread) -----------------------

    def _check(self, account: str, stored: str | None, secret: bytes) -> AuthResult:
        """Verify *secret* against *stored* (or the dummy hash); never raises."""
        with self._hard_cap:
            try:
                return self._check_capped(account, stored, secret)
            except Exception:  # defensive: nothing below should raise, and nothing may leak
                log.exception("unexpected error verifying a password for %r", account)
                return _FAILED

    def _check_capped(self, account: str, stored: str | None, secret: bytes) -> AuthResult:
        if stored is None:
            self._spend_dummy(secret)
            return _FAILED
        try:
            _check_stored_cost(stored)
            self._count_check()
            self._hasher.verify(stored, secret)
        except VerifyMismatchError:
            return _FAILED
        except (InvalidHashError, VerificationError) as exc:
            log.warning(
                "stored password hash of %r is unusable (%s); login refused",
                account,
                type(exc).__name__,
            )
            # A parse error fails fast; spend the usual time so it is not an account oracle.
            self._spend_dummy(secret)
            return _FAILED
        return AuthResult.success(account, needs_rehash=_hasher_needs_rehash(self._hasher, stored))

    def _spend_dummy(self, secret: bytes) -> None:
        self._count_check()
        with contextlib.suppress(VerificationError):
            self._hasher.verify(self._dummy_hash, secret)

    def _count_check(self) -> None:
        with self._lock:
            self._argon2_checks += 1
