"""Unit tests of the message store (`mailharbor.store`): shared constants and helpers.

The tests here use the store's public API (`Store.open`, transactions, `store.index`, reads,
`checkpoint`, `compact`, `read_frames`/`ingest_blocking`) on real files in `tmp_path`; nothing in
the store is mocked. What lives in this module:

* constants (`NODE`, `DOMAIN`, `PWHASH`) and `small_options`, options with tiny segments and chunks
  so that rollover, chunking and compaction happen with little data;
* `log_bytes(store)`: the physical size of the log (sum of the segment files);
* `drop_checkpoints(data_dir)`: delete `<data>/checkpoints/*`, so the next open replays the log;
* `index_differences(a, b)`: a readable list of what differs between two indexes, for failure
  messages next to a comparison of `Index.serialize()`;
* `inbox(store, account)` and `mailbox(store, account, name)`: GUID lookups that fail loudly.

Fixtures (`open_store`, `store`, `alice`) are in `conftest.py`.
"""

from __future__ import annotations

import os
from array import array
from collections.abc import Callable

from mailharbor.store import Store, StoreOptions
from mailharbor.store import index as ix

#: The `open_store` fixture: `open_store(path=data_dir, options=small_options(), node=NODE)`.
OpenStore = Callable[..., Store]

NODE = bytes(range(16))
NODE2 = bytes(range(16, 32))
DOMAIN = "example.org"
PWHASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"


def small_options(
    *,
    segment_bytes: int = 8 * 1024,
    chunk_bytes: int = 1024,
    cache_bytes: int = 64 * 1024,
    checkpoint_every_bytes: int = 1 << 30,
    sync: bool = True,
) -> StoreOptions:
    """Options with small segments and chunks (rollover and chunking with little data); no
    automatic checkpoints unless asked for."""
    return StoreOptions(
        segment_bytes=segment_bytes,
        chunk_bytes=chunk_bytes,
        cache_bytes=cache_bytes,
        checkpoint_every_bytes=checkpoint_every_bytes,
        sync=sync,
    )


def log_bytes(st: Store) -> int:
    """Physical size of the log: the sum of the segment files' sizes."""
    return sum(size for _, size in st.segments())


def drop_checkpoints(data_dir: str) -> int:
    """Delete every checkpoint of a (closed) store; returns how many there were."""
    ckdir = os.path.join(data_dir, "checkpoints")
    names = os.listdir(ckdir) if os.path.isdir(ckdir) else []
    for name in names:
        os.unlink(os.path.join(ckdir, name))
    return len(names)


def mailbox(st: Store, account: bytes, name: str) -> bytes:
    """The GUID of mailbox `name` of `account` (asserts it exists)."""
    mb = st.index.mailbox_by_name(account, name)
    assert mb is not None, f"no mailbox {name!r}"
    return mb.guid


def inbox(st: Store, account: bytes) -> bytes:
    return mailbox(st, account, "INBOX")


def _cols(obj: object, names: tuple[str, ...]) -> dict[str, object]:
    out: dict[str, object] = {}
    for n in names:
        v = getattr(obj, n)
        out[n] = list(v) if isinstance(v, array) else v
    return out


_BLOB_COLS = ("seg", "off", "length", "size", "refs", "meta_seg", "meta_off", "meta_len")
_MAILBOX_COLS = (
    "account",
    "name",
    "uidvalidity",
    "special_use",
    "uidnext",
    "highestmodseq",
    "keywords",
    "uids",
    "modseqs",
    "flags",
    "kwbits",
    "dates",
    "sizes",
    "blobs",
    "msg_guids",
    "vanished_uids",
    "vanished_modseqs",
    "total_size",
)


def index_differences(a: ix.Index, b: ix.Index, limit: int = 20) -> list[str]:
    """What differs between two indexes (field by field), at most `limit` lines."""
    out: list[str] = []
    for name in ("last_lsn", "generation", "message_count", "domains", "aliases"):
        va, vb = getattr(a, name), getattr(b, name)
        if va != vb:
            out.append(f"{name}: {va!r} != {vb!r}")
    ba, bb = a.blobs, b.blobs
    if ba.hashes != bb.hashes:
        out.append(f"blob table: {len(ba)} slots != {len(bb)} slots (or another order)")
    for name in _BLOB_COLS:
        la, lb = list(getattr(ba, name)), list(getattr(bb, name))
        for s in range(max(len(la), len(lb))):
            va = la[s] if s < len(la) else None
            vb = lb[s] if s < len(lb) else None
            if va != vb:
                out.append(f"blob slot {s} ({ba.hash_at(s).hex()[:12]}) {name}: {va} != {vb}")
    if ba.chunks != bb.chunks:
        out.append(f"blob chunk locations: {ba.chunks} != {bb.chunks}")
    elif list(ba.chunks) != list(bb.chunks):
        out.append(
            f"blob chunk map: same entries in another order ({list(ba.chunks)} != "
            f"{list(bb.chunks)}), which serialize() writes as is"
        )
    if ba.pending_chunks != bb.pending_chunks:
        out.append(
            f"pending chunk streams: {sorted(k.hex() for k in ba.pending_chunks)} != "
            f"{sorted(k.hex() for k in bb.pending_chunks)}"
        )
    elif list(ba.pending_chunks) != list(bb.pending_chunks):
        out.append("pending chunk streams: same entries in another order")
    if list(a.mailboxes) != list(b.mailboxes):
        out.append("mailbox sets (or their order) differ")
    for g, ma in a.mailboxes.items():
        mb = b.mailboxes.get(g)
        if mb is None:
            out.append(f"mailbox {ma.name!r} only in the first index")
            continue
        ca, cb = _cols(ma, _MAILBOX_COLS), _cols(mb, _MAILBOX_COLS)
        for n in _MAILBOX_COLS:
            if ca[n] != cb[n]:
                out.append(f"mailbox {ma.name!r} {n}: {ca[n]!r} != {cb[n]!r}")
    if list(a.accounts) != list(b.accounts):
        out.append("account sets (or their order) differ")
    for g, aa in a.accounts.items():
        ab = b.accounts.get(g)
        if ab is not None and aa != ab:
            out.append(f"account {aa.address}: {aa!r} != {ab!r}")
    if list(a.queue) != list(b.queue) or any(a.queue[k] != b.queue.get(k) for k in a.queue):
        out.append("queues differ")
    return out[:limit]
