"""Shared test configuration: Hypothesis profiles, the run's random seed, per-run names.

- Hypothesis profiles: ``dev`` (Hypothesis' defaults, for local runs), ``ci`` (50 examples, no
  deadline, derandomized so CI is reproducible, failing examples printed as a blob) and ``soak``
  (many examples, no deadline). ``soak`` is loaded when ``MAILHARBOR_SOAK`` is set, else ``ci``
  when ``CI`` is set, else ``dev``; ``--hypothesis-profile`` still overrides.
- The seed: one per run, from ``MAILHARBOR_SEED`` or random, shown in the pytest header. The
  ``random`` module is seeded with it for the session, and re-seeded before every test from the
  seed and the test's id, so one test reproduces alone with the same ``MAILHARBOR_SEED``.
- Leftovers: every process a run starts inherits ``MAILHARBOR_TEST_RUN=<pytest pid>``, and the
  ``unique_name`` fixture hands out names ``mh-test-<pid>-<n>``. Use such a name for anything that
  can outlive a killed run (mount points, loop-device files, network namespaces, /tmp dirs,
  processes' arguments): ``tools/cleanup.sh`` (run by ``make test``) removes those of dead runs.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("dev", deadline=None)  # shared 2-core machines: timings are noise
settings.register_profile(
    "ci",
    max_examples=50,
    deadline=None,
    derandomize=True,
    print_blob=True,
    database=None,
)
settings.register_profile(
    "soak",
    max_examples=5000,
    deadline=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
if os.environ.get("MAILHARBOR_SOAK"):
    settings.load_profile("soak")
elif os.environ.get("CI"):
    settings.load_profile("ci")
else:
    settings.load_profile("dev")

#: Prefix of every name a test run gives to things that may outlive it (see tools/cleanup.sh).
RUN_PREFIX = f"mh-test-{os.getpid()}-"
_names = itertools.count(1)
_seed_key = pytest.StashKey[int]()


def _choose_seed() -> int:
    raw = os.environ.get("MAILHARBOR_SEED")
    if raw:
        try:
            return int(raw, 0)
        except ValueError:
            raise pytest.UsageError(f"MAILHARBOR_SEED must be an integer, got {raw!r}") from None
    return random.SystemRandom().randrange(2**32)


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_seed_key] = _choose_seed()
    os.environ["MAILHARBOR_TEST_RUN"] = str(os.getpid())


def pytest_report_header(config: pytest.Config) -> list[str]:
    seed = config.stash[_seed_key]
    return [
        f"mailharbor: seed {seed} (reproduce with MAILHARBOR_SEED={seed}), "
        f"hypothesis profile {settings.get_current_profile_name()!r}, run prefix {RUN_PREFIX}",
    ]


@pytest.fixture(scope="session", autouse=True)
def mailharbor_seed(pytestconfig: pytest.Config) -> int:
    """The run's seed; ``random`` is seeded with it for the session."""
    seed = pytestconfig.stash[_seed_key]
    print(f"mailharbor seed: {seed}")
    random.seed(seed)
    return seed


@pytest.fixture(autouse=True)
def _reseed_per_test(mailharbor_seed: int, request: pytest.FixtureRequest) -> Iterator[None]:
    """Re-seed ``random`` per test so a test's random choices do not depend on test order."""
    random.seed(f"{mailharbor_seed}:{request.node.nodeid}")
    yield


@pytest.fixture
def unique_name() -> str:
    """A name unique within and across runs, ``mh-test-<pytest pid>-<n>``.

    Use it for mount points, loop-device backing files, network namespaces and directories
    under /tmp, so tools/cleanup.sh can find them if the run is killed.
    """
    return f"{RUN_PREFIX}{next(_names)}"
