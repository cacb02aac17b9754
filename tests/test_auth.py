"""Tests for mailharbor.service.auth: hashing, the authenticator's cache, limits and failures.

Argon2 work is observed through ``CountingHasher``, a real ``argon2.PasswordHasher`` whose
``verify`` is wrapped to count calls and measure how many run at once; the result always comes
from the real argon2 verification.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

import pytest
from argon2 import PasswordHasher, Type

from mailharbor.service.auth import (
    DEFAULT_PARAMS,
    FAST_TEST_PARAMS,
    Argon2Params,
    Authenticator,
    AuthResult,
    AuthStatus,
    canonical_account,
    hash_password,
    needs_rehash,
)

pytestmark = pytest.mark.timeout(60)

GATE_TIMEOUT = 10.0  # seconds a gated verification waits before giving up (never in a pass)


class CountingHasher(PasswordHasher):
    """A real PasswordHasher; ``verify`` counts calls and concurrency, optionally gated."""

    def __init__(self, params: Argon2Params = FAST_TEST_PARAMS, hold: float = 0.0) -> None:
        super().__init__(
            time_cost=params.time_cost,
            memory_cost=params.memory_cost_kib,
            parallelism=params.parallelism,
            hash_len=params.hash_len,
            salt_len=params.salt_len,
            type=Type.ID,
        )
        self.calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.hold = hold  # extra seconds inside the in-flight window, to force overlap
        self.gate: threading.Event | None = None  # when set, verify waits for it
        self._mutex = threading.Lock()

    def verify(self, hash: str | bytes, password: str | bytes) -> Literal[True]:
        with self._mutex:
            self.calls += 1
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.gate is not None and not self.gate.wait(GATE_TIMEOUT):
                raise AssertionError("test gate was never opened")
            if self.hold:
                time.sleep(self.hold)
            return super().verify(hash, password)
        finally:
            with self._mutex:
                self.in_flight -= 1


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Store:
    """An account table: canonical address -> PHC hash, counting lookups."""

    def __init__(self, accounts: dict[str, str] | None = None) -> None:
        self.accounts = dict(accounts or {})
        self.lookups: list[str] = []

    def __call__(self, account: str) -> str | None:
        self.lookups.append(account)
        return self.accounts.get(account)


_FAST_HASHES: dict[str, str] = {}


def fast_hash(password: str) -> str:
    """hash_password with FAST_TEST_PARAMS, memoised per password (salts are irrelevant here)."""
    if password not in _FAST_HASHES:
        _FAST_HASHES[password] = hash_password(password, params=FAST_TEST_PARAMS)
    return _FAST_HASHES[password]


@pytest.fixture
def make_auth() -> Iterator[Callable[..., Authenticator]]:
    made: list[Authenticator] = []

    def factory(lookup: Callable[[str], str | None], **kwargs: Any) -> Authenticator:
        if "hasher" not in kwargs and "params" not in kwargs:
            kwargs["params"] = FAST_TEST_PARAMS
        auth = Authenticator(lookup, **kwargs)
        made.append(auth)
        return auth

    yield factory
    for auth in made:
        auth.close()


def run(coro: Awaitable[Any]) -> Any:
    async def main() -> Any:
        return await coro

    return asyncio.run(main())


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


# ---- hashing ---------------------------------------------------------------------------


def test_hash_password_makes_argon2id_with_the_given_params() -> None:
    h = hash_password("correct horse", params=FAST_TEST_PARAMS)
    assert h.startswith("$argon2id$v=19$m=8,t=1,p=1$")
    assert hash_password("correct horse", params=FAST_TEST_PARAMS) != h  # fresh salt
    assert PasswordHasher().verify(h, "correct horse")

    default = hash_password("correct horse")
    assert default.startswith("$argon2id$v=19$m=19456,t=2,p=1$")
    assert Argon2Params(time_cost=2, memory_cost_kib=19 * 1024, parallelism=1) == DEFAULT_PARAMS


def test_needs_rehash() -> None:
    fast = hash_password("pw", params=FAST_TEST_PARAMS)
    assert not needs_rehash(fast, params=FAST_TEST_PARAMS)
    assert needs_rehash(fast)  # weaker than the defaults
    argon2i = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1, type=Type.I)
    assert needs_rehash(argon2i.hash("pw"))  # right cost, wrong variant
    assert needs_rehash("not a hash at all")


@pytest.mark.parametrize("bad", ["", "x" * 1025, "\ud800"])
def test_hash_password_refuses_passwords_that_could_never_log_in(bad: str) -> None:
    with pytest.raises(ValueError):
        hash_password(bad, params=FAST_TEST_PARAMS)


def test_argon2_params_validate() -> None:
    with pytest.raises(ValueError):
        Argon2Params(memory_cost_kib=4)
    with pytest.raises(ValueError):
        Argon2Params(time_cost=0)


# ---- basic verification ----------------------------------------------------------------


def test_correct_and_incorrect_password(make_auth: Callable[..., Authenticator]) -> None:
    store = Store({"alice@example.org": fast_hash("s3cret")})
    auth = make_auth(store)

    async def scenario() -> tuple[AuthResult, AuthResult]:
        return await auth.verify("alice@example.org", "s3cret"), await auth.verify(
            "alice@example.org", "S3cret"
        )

    good, bad = run(scenario())
    assert good.status is AuthStatus.OK and good.ok
    assert good.account == "alice@example.org"
    assert not good.needs_rehash
    assert bad.status is AuthStatus.FAILED and bad.account is None


def test_unknown_user_fails_like_a_wrong_password_and_spends_an_argon2_check(
    make_auth: Callable[..., Authenticator],
) -> None:
    hasher = CountingHasher()
    store = Store({"alice@example.org": fast_hash("s3cret")})
    auth = make_auth(store, hasher=hasher)

    async def scenario() -> tuple[AuthResult, AuthResult]:
        unknown = await auth.verify("mallory@example.org", "s3cret")
        wrong = await auth.verify("alice@example.org", "guess")
        return unknown, wrong

    unknown, wrong = run(scenario())
    assert unknown.status is AuthStatus.FAILED
    assert unknown == wrong  # same status, same reason: nothing tells the two apart
    assert hasher.calls == 2  # one real argon2 verification each
    assert store.lookups == ["mallory@example.org", "alice@example.org"]


@pytest.mark.parametrize(
    "corrupt",
    [
        "garbage",
        "$argon2id$v=19$m=8,t=1,p=1$AAAA$!!!!",  # undecodable salt/hash
        "$argon2id$v=19$m=8,t=1$c2FsdHNhbHQ$aGFzaGhhc2g",  # missing parameter
        # absurd cost: must be refused, not computed (that would allocate 4 GiB)
        "$argon2id$v=19$m=4194304,t=1000,p=1$c2FsdHNhbHRzYWx0$aGFzaGhhc2hoYXNoaGFzaA",
    ],
)
def test_corrupt_stored_hash_fails_without_exception_and_logs(
    make_auth: Callable[..., Authenticator], caplog: pytest.LogCaptureFixture, corrupt: str
) -> None:
    hasher = CountingHasher()
    auth = make_auth(Store({"bob@example.org": corrupt}), hasher=hasher)
    with caplog.at_level(logging.WARNING, logger="mailharbor.service.auth"):
        result = run(auth.verify("bob@example.org", "whatever"))
        blocking = auth.verify_blocking("bob@example.org", "whatever")
    assert result == blocking == AuthResult.failed()
    assert result.reason == "authentication failed"  # fixed text, no exception message
    assert any(
        "unusable" in r.getMessage() and "bob@example.org" in r.getMessage() for r in caplog.records
    )
    assert hasher.calls >= 2  # the failure still cost argon2 work (no fast-path oracle)


def test_outdated_hash_is_flagged_for_rehash(make_auth: Callable[..., Authenticator]) -> None:
    store = Store({"carol@example.org": fast_hash("pw")})
    auth = make_auth(store, params=Argon2Params(time_cost=1, memory_cost_kib=64))
    result = run(auth.verify("carol@example.org", "pw"))
    assert result.ok and result.needs_rehash


def test_default_params_verify_and_event_loop_stays_responsive(
    make_auth: Callable[..., Authenticator],
) -> None:
    """Real default-cost argon2: the loop keeps ticking *while* checks are running."""
    hasher = CountingHasher(params=DEFAULT_PARAMS)
    users = {f"user{i}@example.org": hash_password(f"pw{i}") for i in range(4)}
    auth = make_auth(Store(users), hasher=hasher, max_concurrent_checks=2)
    samples: list[int] = []

    async def scenario() -> list[AuthResult]:
        done = asyncio.Event()

        async def ticker() -> None:
            while not done.is_set():
                samples.append(hasher.in_flight)
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        results = await asyncio.gather(*(auth.verify(u, f"pw{i}") for i, u in enumerate(users)))
        wrong = await auth.verify("user0@example.org", "nope")
        done.set()
        await tick
        return [*results, wrong]

    results = run(scenario())
    assert [r.account for r in results[:4]] == list(users)
    assert results[4].status is AuthStatus.FAILED
    assert hasher.calls == 5
    # If argon2 ran on the loop, the ticker could never observe a check in progress.
    assert sum(1 for s in samples if s > 0) >= 3
    assert max(samples) <= 2


# ---- user names ------------------------------------------------------------------------


def test_username_domain_and_local_part_are_case_insensitive(
    make_auth: Callable[..., Authenticator],
) -> None:
    store = Store({"alice.smith+lists@example.org": fast_hash("pw")})
    auth = make_auth(store)

    async def scenario() -> list[AuthResult]:
        return [
            await auth.verify("Alice.Smith+Lists@EXAMPLE.org", "pw"),
            await auth.verify("alicesmith+lists@example.org", "pw"),  # dots are significant
            await auth.verify("alice.smith@example.org", "pw"),  # +detail is significant
        ]

    ok, no_dots, no_detail = run(scenario())
    assert ok.ok and ok.account == "alice.smith+lists@example.org"
    assert no_dots.status is AuthStatus.FAILED
    assert no_detail.status is AuthStatus.FAILED


def test_canonical_account() -> None:
    assert canonical_account("Bob@Example.COM") == "bob@example.com"
    assert canonical_account('"a@b"@Example.com') == '"a@b"@example.com'
    assert canonical_account("Admin") == "admin"
    for bad in ["", "@example.com", "bob@", "bob @example.com", "bob\r\n@x", "x" * 321, "\ud800"]:
        assert canonical_account(bad) is None


def test_malformed_input_fails_without_lookup(make_auth: Callable[..., Authenticator]) -> None:
    store = Store({"bob@example.org": fast_hash("pw")})
    auth = make_auth(store)

    async def scenario() -> list[AuthResult]:
        return [
            await auth.verify("bob\x00@example.org", "pw"),
            await auth.verify("bob@example.org", ""),
            await auth.verify("bob@example.org", "x" * 2000),
        ]

    assert all(r.status is AuthStatus.FAILED for r in run(scenario()))
    assert store.lookups == []


def test_lookup_error_is_tempfail_without_exception_text(
    make_auth: Callable[..., Authenticator], caplog: pytest.LogCaptureFixture
) -> None:
    def lookup(account: str) -> str | None:
        raise OSError("disk on fire: /var/lib/secret/path")

    auth = make_auth(lookup)
    with caplog.at_level(logging.ERROR, logger="mailharbor.service.auth"):
        result = run(auth.verify("bob@example.org", "pw"))
    assert result.status is AuthStatus.TEMPFAIL
    assert "fire" not in result.reason and "secret" not in result.reason
    assert any("lookup failed" in r.getMessage() for r in caplog.records)


# ---- the success cache -----------------------------------------------------------------


def test_login_storm_costs_one_argon2_check_per_cache_period(
    make_auth: Callable[..., Authenticator],
) -> None:
    hasher = CountingHasher()
    clock = FakeClock()
    auth = make_auth(
        Store({"phone@example.org": fast_hash("pw")}), hasher=hasher, clock=clock, cache_seconds=60
    )

    async def storm() -> list[AuthResult]:
        return list(
            await asyncio.gather(*(auth.verify("phone@example.org", "pw") for _ in range(50)))
        )

    async def scenario() -> None:
        first = await storm()
        assert all(r.ok and r.account == "phone@example.org" for r in first)
        assert hasher.calls == 1

        clock.now += 59.9
        second = await storm()
        assert all(r.ok for r in second)
        assert hasher.calls == 1  # still cached

        clock.now += 0.2  # 60.1 s after the check: expired
        third = await storm()
        assert all(r.ok for r in third)
        assert hasher.calls == 2

    run(scenario())
    stats = auth.stats()
    assert stats.argon2_checks == 2
    assert stats.cache_hits + stats.shared == 148


def test_changed_password_invalidates_the_cache(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher()
    store = Store({"dave@example.org": fast_hash("old")})
    auth = make_auth(store, hasher=hasher, clock=FakeClock())

    async def scenario() -> None:
        assert (await auth.verify("dave@example.org", "old")).ok
        assert (await auth.verify("dave@example.org", "old")).ok
        assert hasher.calls == 1

        store.accounts["dave@example.org"] = fast_hash("new")
        assert (await auth.verify("dave@example.org", "old")).status is AuthStatus.FAILED
        assert hasher.calls == 2
        assert (await auth.verify("dave@example.org", "new")).ok
        assert hasher.calls == 3

        del store.accounts["dave@example.org"]  # deleted account: cache must not let it in
        assert (await auth.verify("dave@example.org", "new")).status is AuthStatus.FAILED

    run(scenario())


def test_wrong_password_is_never_served_from_cache(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher()
    auth = make_auth(Store({"erin@example.org": fast_hash("right")}), hasher=hasher)

    async def scenario() -> None:
        assert (await auth.verify("erin@example.org", "right")).ok
        for n in range(1, 6):
            result = await auth.verify("erin@example.org", "wrong")
            assert result.status is AuthStatus.FAILED
            assert hasher.calls == 1 + n  # every wrong guess pays for argon2
        assert (await auth.verify("erin@example.org", "right")).ok
        assert hasher.calls == 6  # the good one is still cached

    run(scenario())


def test_cache_is_bounded_lru(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher()
    users = {f"u{i}@example.org": fast_hash("pw") for i in range(3)}
    auth = make_auth(Store(users), hasher=hasher, cache_size=2, clock=FakeClock())

    async def scenario() -> None:
        for u in ["u0@example.org", "u1@example.org", "u0@example.org", "u2@example.org"]:
            assert (await auth.verify(u, "pw")).ok
        assert hasher.calls == 3  # u0 was a hit; u2 evicted u1, the least recently used
        assert (await auth.verify("u0@example.org", "pw")).ok
        assert hasher.calls == 3
        assert (await auth.verify("u1@example.org", "pw")).ok
        assert hasher.calls == 4

    run(scenario())


# ---- concurrency limits ----------------------------------------------------------------


def test_at_most_max_concurrent_checks_in_flight(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher(hold=0.03)
    users = {f"user{i}@example.org": fast_hash(f"pw{i}") for i in range(8)}
    auth = make_auth(Store(users), hasher=hasher, max_concurrent_checks=2)

    async def scenario() -> list[AuthResult]:
        return list(await asyncio.gather(*(auth.verify(u, f"pw{i}") for i, u in enumerate(users))))

    results = run(scenario())
    assert [r.account for r in results] == list(users)
    assert all(r.ok for r in results)
    assert hasher.calls == 8
    assert hasher.max_in_flight == 2  # the limit held, and the pool was actually used


def test_full_queue_answers_tempfail(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher()
    hasher.gate = threading.Event()
    users = {f"user{i}@example.org": fast_hash(f"pw{i}") for i in range(4)}
    auth = make_auth(Store(users), hasher=hasher, max_concurrent_checks=1, max_queued_checks=1)

    async def scenario() -> None:
        running = asyncio.create_task(auth.verify("user0@example.org", "pw0"))
        queued = asyncio.create_task(auth.verify("user1@example.org", "pw1"))
        await wait_until(lambda: hasher.in_flight == 1)

        refused = await auth.verify("user2@example.org", "pw2")
        assert refused.status is AuthStatus.TEMPFAIL
        assert refused.reason == "too many concurrent authentications"
        # Unknown users are refused the same way: the queue is no account oracle.
        assert (await auth.verify("nobody@example.org", "x")).status is AuthStatus.TEMPFAIL

        assert hasher.gate is not None
        hasher.gate.set()
        assert (await running).ok and (await queued).ok
        assert (await auth.verify("user3@example.org", "pw3")).ok  # room again

    run(scenario())
    assert auth.stats().refused_busy == 2


def test_cancelled_queued_login_frees_its_slot(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher()
    hasher.gate = threading.Event()
    users = {f"user{i}@example.org": fast_hash(f"pw{i}") for i in range(3)}
    auth = make_auth(Store(users), hasher=hasher, max_concurrent_checks=1, max_queued_checks=1)

    async def scenario() -> None:
        running = asyncio.create_task(auth.verify("user0@example.org", "pw0"))
        queued = asyncio.create_task(auth.verify("user1@example.org", "pw1"))
        await wait_until(lambda: hasher.in_flight == 1)
        queued.cancel()  # the client hung up while waiting
        with pytest.raises(asyncio.CancelledError):
            await queued
        await asyncio.sleep(0)
        late = asyncio.create_task(auth.verify("user2@example.org", "pw2"))
        await asyncio.sleep(0.01)
        assert not late.done()  # queued, not refused
        assert hasher.gate is not None
        hasher.gate.set()
        assert (await running).ok and (await late).ok

    run(scenario())
    assert hasher.calls == 2  # the abandoned login never reached argon2


# ---- the blocking API ------------------------------------------------------------------


def test_verify_blocking_shares_the_cache(make_auth: Callable[..., Authenticator]) -> None:
    hasher = CountingHasher()
    auth = make_auth(Store({"cli@example.org": fast_hash("pw")}), hasher=hasher)
    assert auth.verify_blocking("CLI@example.org", "pw") == AuthResult.success("cli@example.org")
    assert auth.verify_blocking("cli@example.org", "bad").status is AuthStatus.FAILED
    assert auth.verify_blocking("nobody@example.org", "pw").status is AuthStatus.FAILED
    assert hasher.calls == 3
    assert run(auth.verify("cli@example.org", "pw")).ok
    assert hasher.calls == 3  # served from the cache the blocking call filled


def test_verify_blocking_refuses_to_block_an_event_loop(
    make_auth: Callable[..., Authenticator],
) -> None:
    auth = make_auth(Store())

    async def scenario() -> None:
        with pytest.raises(RuntimeError):
            auth.verify_blocking("a@example.org", "pw")

    run(scenario())


def test_authenticator_can_serve_a_new_loop_after_the_old_one_closed(
    make_auth: Callable[..., Authenticator],
) -> None:
    auth = make_auth(Store({"a@example.org": fast_hash("pw")}), cache_seconds=0)
    assert run(auth.verify("a@example.org", "pw")).ok
    assert run(auth.verify("a@example.org", "pw")).ok
