"""Crash tests of the store: shared helpers (logical state, checks, the writer process).

The tests in this package check DESIGN.md's crash promise — everything acknowledged is there
after a power cut at any fsync boundary or at a random point, nothing half-written is visible —
with three tools: `crashmodel.CacheModelFS` (in process, a snapshot at every fsync),
`fault.powerloss_fs.PowerLossMount` (a real process writing through FUSE) and real faulty disks
(`fault.disks`: ENOSPC on small file systems, EIO from fsync under strace).

What lives here:

* `logical_state(store)`: everything a client can observe (accounts, domains, mailboxes with
  their UIDVALIDITY/UIDNEXT/HIGHESTMODSEQ, every message's UID, MODSEQ, flags, keywords, body
  hash), as a comparable value; LSNs are left out (orphaned chunk frames take LSNs too);
* `check_bodies(store, bodies)`: every visible body reads back byte-exact;
* the **writer**: `python -c 'import store_crash; store_crash.writer_main()' ARGS` (with tests/ on
  `sys.path`) delivers deterministic messages (`message(seed, i)`) to a prepared store and prints
  `ACK i lsn` after each commit returned, so a parent that kills the process or cuts the power
  knows exactly what was acknowledged. `check_writer_messages` checks a reopened store against
  those acknowledgements.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import hashlib
import os
import random
import sys
from collections.abc import Iterable
from dataclasses import dataclass

from mailharbor.store import Store, StoreIOError, StoreOptions, StoreReadOnly, StoreState

NODE = bytes(range(16))
PWHASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
DOMAIN = "example.org"
WRITER_ACCOUNTS = tuple(f"user{i}@{DOMAIN}" for i in range(4))


# --- logical state --------------------------------------------------------------------------------


def logical_state(st: Store) -> tuple[object, ...]:
    """What a client can observe of the store, as a comparable value (see the module doc)."""
    idx = st.index
    b = idx.blobs
    accounts = sorted(
        (
            a.address,
            a.guid.hex(),
            a.password_hash,
            a.quota_bytes,
            tuple(sorted(a.subscriptions)),
            tuple(sorted((k, g.hex()) for k, g in a.mailboxes.items())),
        )
        for a in idx.accounts.values()
    )
    mailboxes = []
    for mb in idx.mailboxes.values():
        msgs = tuple(
            (
                mb.uids[i],
                mb.modseqs[i],
                mb.flags[i],
                tuple(sorted(mb.keyword_names(mb.kwbits[i]))),
                mb.sizes[i],
                b.hash_at(mb.blobs[i]).hex(),
                mb.msg_guid(i).hex(),
            )
            for i in range(len(mb))
        )
        mailboxes.append(
            (
                mb.guid.hex(),
                mb.account.hex(),
                mb.name,
                mb.uidvalidity,
                mb.special_use,
                mb.uidnext,
                mb.highestmodseq,
                msgs,
                tuple(mb.vanished_uids),
            )
        )
    return (
        tuple(sorted(idx.domains)),
        tuple(sorted(idx.aliases.items())),
        tuple(accounts),
        tuple(sorted(mailboxes)),
    )


def state_message_count(state: tuple[object, ...]) -> int:
    """How many message entries a `logical_state` value holds."""
    mailboxes = state[3]
    assert isinstance(mailboxes, tuple)
    return sum(len(m[7]) for m in mailboxes)


def describe_state(state: tuple[object, ...]) -> str:
    """A short summary of a `logical_state` value for failure messages."""
    accounts, mailboxes = state[2], state[3]
    assert isinstance(accounts, tuple) and isinstance(mailboxes, tuple)
    return (
        f"{len(accounts)} accounts, {len(mailboxes)} mailboxes, "
        f"{state_message_count(state)} messages"
    )


def visible_hashes(st: Store) -> dict[bytes, set[bytes]]:
    """Body hash -> the mailbox GUIDs that show a message with that body."""
    out: dict[bytes, set[bytes]] = {}
    b = st.index.blobs
    for mb in st.index.mailboxes.values():
        for slot in mb.blobs:
            out.setdefault(b.hash_at(slot), set()).add(mb.guid)
    return out


def check_bodies(st: Store, bodies: dict[bytes, bytes]) -> list[str]:
    """Every visible message's body must read back byte-exact; returns the problems found."""
    problems = []
    for h in visible_hashes(st):
        want = bodies.get(h)
        if want is None:
            problems.append(f"a message with an unknown body {h.hex()[:16]} is visible")
            continue
        try:
            got = st.read_blob(h)
        except Exception as e:
            problems.append(f"body {h.hex()[:16]} unreadable: {type(e).__name__}: {e}")
            continue
        if got != want:
            problems.append(f"body {h.hex()[:16]} differs ({len(got)} B read, {len(want)} B)")
    return problems


def inbox_of(st: Store, address: str) -> bytes:
    acct = st.index.account_by_address(address)
    assert acct is not None, f"no account {address}"
    return acct.mailboxes["INBOX"]


def prepare_store(data_dir: str, options: StoreOptions, accounts: Iterable[str] = ()) -> None:
    """Create a store at `data_dir` on the plain OS file system (fsynced), with `DOMAIN` and
    `accounts` if any, and close it: the starting point that a crash test takes as durable."""
    st = Store.open(data_dir, node_id=NODE, options=options)
    try:
        accts = list(accounts)
        if accts:
            with st.transaction() as t:
                t.add_domain(DOMAIN)
                for a in accts:
                    t.add_account(a, PWHASH)
    finally:
        st.close()


def tree_size(path: str) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for f in files:
            total += os.path.getsize(os.path.join(dirpath, f))
    return total


# --- the writer process -------------------------------------------------------------------------

WRITER_OPTIONS = StoreOptions(
    segment_bytes=96 * 1024,
    chunk_bytes=16 * 1024,
    checkpoint_every_bytes=256 * 1024,
    cache_bytes=1 << 20,
)


@dataclass(frozen=True, slots=True)
class Message:
    """Attempt `i` of a writer run: a unique body (its own Message-ID) for 1..3 recipients."""

    i: int
    body: bytes
    recipients: tuple[str, ...]

    @property
    def hash(self) -> bytes:
        return hashlib.blake2b(self.body, digest_size=32).digest()


def message(seed: int, i: int) -> Message:
    """The deterministic message number `i` of a writer run with `seed`."""
    rng = random.Random(f"{seed}:{i}")
    n = rng.choice((1, 1, 1, 2, 3))
    recipients = tuple(rng.sample(WRITER_ACCOUNTS, n))
    big = rng.random() < 0.15
    size = rng.randint(40_000, 90_000) if big else rng.randint(200, 6_000)
    head = (
        f"Message-ID: <{seed}.{i}@crash.test>\r\nFrom: a@{DOMAIN}\r\n"
        f"To: {', '.join(recipients)}\r\nSubject: attempt {i}\r\n\r\n"
    ).encode()
    return Message(i, head + rng.randbytes(size // 2).hex().encode()[:size], recipients)


def writer_main(argv: list[str] | None = None) -> None:
    """Entry point of the writer process (see the module doc). Modes:

    * `free`: commit messages 0..n-1 as fast as possible, printing `ACK i lsn` after each;
    * `lockstep`: the same, but wait for a line on stdin before each commit;
    * `async`: `--tasks` concurrent committers share group commit (`ACK i lsn` in ack order);
    * `eio`: like `free` until a commit raises StoreIOError; then print `FAILED i`, check that
      the store is in ERROR, refuses writes and still serves reads, and exit 0.
    """
    p = argparse.ArgumentParser(prog="store_crash writer")
    p.add_argument("data_dir")
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--mode", choices=("free", "lockstep", "async", "eio"), default="free")
    p.add_argument("--tasks", type=int, default=4)
    p.add_argument("--segment-bytes", type=int, default=WRITER_OPTIONS.segment_bytes)
    args = p.parse_args(argv)
    opts = dataclasses.replace(WRITER_OPTIONS, segment_bytes=args.segment_bytes)
    st = Store.open(args.data_dir, node_id=NODE, options=opts)
    print(f"OPEN {st.index.last_lsn}", flush=True)
    inbox = {a: inbox_of(st, a) for a in WRITER_ACCOUNTS}

    def put(t: object, m: Message) -> None:
        from mailharbor.store import Transaction

        assert isinstance(t, Transaction)
        h = t.put_blob(m.body)
        t.deliver(h, [inbox[r] for r in m.recipients])

    if args.mode == "async":

        async def committer(q: asyncio.Queue[int]) -> None:
            while not q.empty():
                i = q.get_nowait()
                m = message(args.seed, i)
                async with st.transaction() as t:
                    put(t, m)
                print(f"ACK {i} {t.committed_lsn}", flush=True)

        async def run() -> None:
            q: asyncio.Queue[int] = asyncio.Queue()
            for i in range(args.count):
                q.put_nowait(i)
            await asyncio.gather(*(committer(q) for _ in range(args.tasks)))

        asyncio.run(run())
        st.close()
        print("DONE", flush=True)
        return

    acked: list[Message] = []
    for i in range(args.count):
        if args.mode == "lockstep" and not sys.stdin.readline():
            break
        m = message(args.seed, i)
        try:
            with st.transaction() as t:
                put(t, m)
        except StoreIOError as e:
            if args.mode != "eio":
                raise
            print(f"FAILED {i} {e}", flush=True)
            ok = st.state == StoreState.ERROR
            try:
                with st.transaction() as t:
                    put(t, message(args.seed, i + 1))
                ok = False
            except StoreReadOnly:
                pass
            if acked and st.read_blob(acked[-1].hash) != acked[-1].body:
                ok = False
            if st.index.account_by_address(WRITER_ACCOUNTS[0]) is None:
                ok = False
            print(f"ERROR-STATE {'ok' if ok else 'WRONG'} {st.state.value}", flush=True)
            st.close()
            return
        acked.append(m)
        print(f"ACK {i} {t.committed_lsn}", flush=True)
    st.close()
    print("DONE", flush=True)


def writer_argv(
    data_dir: str,
    seed: int,
    count: int,
    mode: str,
    *,
    tasks: int = 4,
    segment_bytes: int = WRITER_OPTIONS.segment_bytes,
) -> list[str]:
    """The command line of a writer process (run it with `writer_env()`)."""
    return [
        sys.executable,
        "-c",
        "import store_crash; store_crash.writer_main()",
        data_dir,
        "--seed",
        str(seed),
        "--count",
        str(count),
        "--mode",
        mode,
        "--tasks",
        str(tasks),
        "--segment-bytes",
        str(segment_bytes),
    ]


def writer_env() -> dict[str, str]:
    env = dict(os.environ)
    tests_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    src_dir = os.path.join(os.path.dirname(tests_dir), "src")
    env["PYTHONPATH"] = os.pathsep.join(
        [tests_dir, src_dir, *filter(None, [env.get("PYTHONPATH")])]
    )
    return env


def parse_acks(lines: Iterable[str]) -> dict[int, int]:
    """`ACK i lsn` lines -> {i: lsn}."""
    out: dict[int, int] = {}
    for ln in lines:
        parts = ln.split()
        if len(parts) == 3 and parts[0] == "ACK":
            out[int(parts[1])] = int(parts[2])
    return out


def check_writer_messages(
    st: Store,
    seed: int,
    attempted: int,
    acked: Iterable[int],
    *,
    sequential: bool,
) -> list[str]:
    """Check a reopened writer store: every acknowledged message is in all its recipients'
    INBOXes with its exact body; every other attempt is in all of them or in none (never
    partly); with `sequential` (one committer), what is visible is a prefix of the attempts.
    Returns the problems found."""
    problems: list[str] = []
    acked_set = set(acked)
    vis = visible_hashes(st)
    inbox = {a: inbox_of(st, a) for a in WRITER_ACCOUNTS}
    present: list[int] = []
    known: set[bytes] = set()
    for i in range(attempted):
        m = message(seed, i)
        known.add(m.hash)
        want = {inbox[r] for r in m.recipients}
        got = vis.get(m.hash, set())
        if got:
            present.append(i)
        if i in acked_set and got != want:
            problems.append(
                f"acknowledged message {i} is in {len(got)} of its {len(want)} mailboxes"
            )
        elif got and got != want:
            problems.append(
                f"unacknowledged message {i} is partly visible ({len(got)} of {len(want)})"
            )
        if got:
            try:
                if st.read_blob(m.hash) != m.body:
                    problems.append(f"message {i}: body differs")
            except Exception as e:
                problems.append(f"message {i}: body unreadable: {type(e).__name__}: {e}")
    extra = [h for h in vis if h not in known]
    if extra:
        problems.append(f"{len(extra)} visible message bodies were never attempted")
    if sequential and present and present != list(range(len(present))):
        problems.append(f"visible attempts are not a prefix: {present[:20]}...")
    return problems
