"""`store fsck`: verify the whole store, and with `repair` salvage what is intact.

Theory of operation
-------------------
fsck trusts nothing node-local: it ignores checkpoints for the replay and reads every segment
from its first byte, verifying each segment header, each frame's header and payload CRC, LSN
continuity and every record's layout, and rebuilds the index from scratch. It then re-hashes
every stored body (BLAKE2b-256) and lists the messages whose body is missing or damaged, and
compares each checkpoint with the replayed index at the checkpoint's LSN.

Damage is described exactly: which LSNs were lost, at which segment and byte range, and which
messages (account, mailbox, UID) lost their body. Without `repair` nothing is written.

`repair` (the node must be stopped; fsck holds the data-directory lock):
* a damaged region in the middle of the log is replaced by a HOLE frame covering the lost LSNs
  (the segment is rewritten atomically, its rewrite counter bumped), so the LSN sequence stays
  continuous and everything after the damage is kept;
* a torn tail of the last segment is truncated (the same as a normal open does);
* all checkpoints are deleted (the next open replays fully and writes a new one);
* messages whose body is missing or damaged are expunged in one new transaction, and listed.
On a replicated pair the replication layer will instead mark the range Inconsistent and fetch it
from the peer; this is the single-node salvage.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from mailharbor.store import format as fmt
from mailharbor.store import index as ix
from mailharbor.store.fsio import FileSystem, OsFileSystem
from mailharbor.store.log import list_segments, scan_segment, segment_path
from mailharbor.store.store import (
    CHECKPOINT_DIR,
    LOG_DIR,
    Store,
    StoreOptions,
    blob_hash,
    lock_data_dir,
    now_ms,
    parse_checkpoint,
)


@dataclass(frozen=True, slots=True)
class Damage:
    """One unreadable region of the log."""

    segno: int
    offset: int
    end: int  # byte offset where readable data resumes (or the segment size)
    first_lsn: int
    lost_lsns: int  # how many LSNs the region held (0 if unknown: a torn tail)
    reason: str
    torn_tail: bool


@dataclass(frozen=True, slots=True)
class LostMessage:
    account: str
    mailbox: str
    uid: int
    reason: str


@dataclass(slots=True)
class FsckReport:
    """The outcome of `fsck`. `ok` is True when nothing is damaged."""

    data_dir: str
    segments: int = 0
    frames: int = 0
    last_lsn: int = 0
    log_bytes: int = 0
    bodies_checked: int = 0
    damage: list[Damage] = field(default_factory=list)
    lost_messages: list[LostMessage] = field(default_factory=list)
    bad_records: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    bad_bodies: set[bytes] = field(default_factory=set)  # hashes of damaged or lost bodies

    @property
    def ok(self) -> bool:
        return not (
            self.damage
            or self.lost_messages
            or self.bad_records
            or any("MISMATCH" in c or "unreadable" in c for c in self.checkpoints)
        )

    def lines(self) -> list[str]:
        out = [
            f"store {self.data_dir}: {self.segments} segment(s), {self.frames} frame(s), "
            f"last LSN {self.last_lsn}, {self.log_bytes} bytes, "
            f"{self.bodies_checked} bodies verified"
        ]
        for d in self.damage:
            what = (
                "torn tail"
                if d.torn_tail
                else f"LSNs {d.first_lsn}..{d.first_lsn + d.lost_lsns - 1} lost"
            )
            out.append(f"DAMAGE segment {d.segno} bytes {d.offset}..{d.end}: {what} ({d.reason})")
        for r in self.bad_records:
            out.append(f"BAD RECORD {r}")
        for m in self.lost_messages:
            out.append(f"LOST MESSAGE {m.account} {m.mailbox} UID {m.uid}: {m.reason}")
        out.extend(f"checkpoint {c}" for c in self.checkpoints)
        out.extend(f"REPAIRED {r}" for r in self.repaired)
        out.append(
            "result: OK"
            if self.ok
            else (
                "result: damage found"
                + (" (repaired)" if self.repaired else " — run `mailharbor store fsck --repair`")
            )
        )
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "data_dir": self.data_dir,
            "segments": self.segments,
            "frames": self.frames,
            "last_lsn": self.last_lsn,
            "log_bytes": self.log_bytes,
            "bodies_checked": self.bodies_checked,
            "damage": [dataclasses.asdict(d) for d in self.damage],
            "lost_messages": [dataclasses.asdict(m) for m in self.lost_messages],
            "bad_records": list(self.bad_records),
            "checkpoints": list(self.checkpoints),
            "repaired": list(self.repaired),
        }


def fsck(
    data_dir: str, *, node_id: bytes, repair: bool = False, fs: FileSystem | None = None
) -> FsckReport:
    """Verify the store in `data_dir` (which no node may be using); see the module docstring."""
    fs = fs or OsFileSystem()
    lock_fd = lock_data_dir(data_dir)
    try:
        report, index = _scan(fs, data_dir)
        if repair and not report.ok:
            _repair(fs, data_dir, report)
    finally:
        os.close(lock_fd)
    if repair and report.repaired:
        _expunge_lost(data_dir, node_id, report, index)
    return report


def _scan(fs: FileSystem, data_dir: str) -> tuple[FsckReport, ix.Index]:
    logdir = os.path.join(data_dir, LOG_DIR)
    report = FsckReport(data_dir)
    index = ix.Index()
    ckpts = _checkpoints(fs, data_dir, report)
    segnos = list_segments(fs, logdir) if fs.exists(logdir) else []
    report.segments = len(segnos)
    expected = 0
    prev_size = cur_size = 0
    for n, s in enumerate(segnos):
        path = segment_path(logdir, s)
        f = fs.open_read(path)
        try:
            size = f.size()
            head = f.pread(fmt.SEGMENT_HEADER_SIZE, 0)
        finally:
            f.close()
        report.log_bytes += size
        prev_size, cur_size = cur_size, size  # sizes of segments s-1 and s
        try:
            hdr = fmt.SegmentHeader.decode(head)
        except fmt.FormatError as e:
            report.damage.append(
                Damage(s, 0, size, expected or 1, 0, f"segment header: {e}", n == len(segnos) - 1)
            )
            continue
        if expected == 0:
            expected = hdr.first_lsn
            index.last_lsn = expected - 1
        elif hdr.first_lsn != expected:
            # The previous segment lost its end: LSNs expected..first_lsn-1 are gone.
            if hdr.first_lsn > expected:
                # The previous segment lost its end (or its header): LSNs expected..first_lsn-1.
                prev = report.damage[-1] if report.damage else None
                if (
                    prev is not None
                    and prev.segno == s - 1
                    and (prev.torn_tail or prev.offset == 0)
                ):
                    report.damage[-1] = Damage(
                        prev.segno,
                        prev.offset,
                        prev.end,
                        expected,
                        hdr.first_lsn - expected,
                        prev.reason,
                        False,
                    )
                else:
                    report.damage.append(
                        Damage(
                            s - 1,
                            prev_size,
                            prev_size,
                            expected,
                            hdr.first_lsn - expected,
                            "LSNs missing between segments",
                            False,
                        )
                    )
            else:
                report.bad_records.append(
                    f"segment {s} starts at LSN {hdr.first_lsn}, expected {expected}"
                )
            expected = hdr.first_lsn
            index.last_lsn = expected - 1
        start = fmt.SEGMENT_HEADER_SIZE
        while True:
            frames, stops = scan_segment(fs, path, s, start, expected)
            for fr in frames:
                report.frames += 1
                try:
                    index.apply_frame(fr.header, fr.payload, s, fr.payload_offset)
                except fmt.FormatError as e:
                    report.bad_records.append(f"LSN {fr.header.lsn}: {e}")
                    index.last_lsn = fr.header.lsn
                expected += fr.lsn_count
                if fr.header.lsn in ckpts:
                    _compare_checkpoint(index, fr.header.lsn, ckpts.pop(fr.header.lsn), report)
            if not stops:
                break
            st = stops[0]
            if st.torn:
                report.damage.append(Damage(s, st.offset, size, expected, 0, st.reason, True))
                break
            assert st.next_valid_offset is not None and st.next_valid_lsn is not None
            lost = st.next_valid_lsn - expected
            what = _describe_damaged(fs, path, st.offset, st.next_valid_offset, index)
            report.damage.append(
                Damage(
                    s,
                    st.offset,
                    st.next_valid_offset,
                    expected,
                    lost,
                    st.reason + (f"; it held {what}" if what else ""),
                    False,
                )
            )
            index.last_lsn = st.next_valid_lsn - 1
            expected = st.next_valid_lsn
            start = st.next_valid_offset
    report.last_lsn = expected - 1 if expected else 0
    for lsn in ckpts:
        report.checkpoints.append(f"LSN {lsn}: beyond the readable log — MISMATCH")
    _verify_bodies(fs, logdir, index, report)
    return report, index


def _describe_damaged(fs: FileSystem, path: str, start: int, end: int, index: ix.Index) -> str:
    """Best effort: what the first damaged frame contained, if its header is intact."""
    f = fs.open_read(path)
    try:
        data = f.pread(end - start, start)
    finally:
        f.close()
    try:
        hdr = fmt.decode_frame_header(data)
    except fmt.FormatError:
        return ""
    found: list[str] = []
    try:
        for typ, off, ln in fmt.iter_record_spans(data[fmt.FRAME_HEADER_SIZE :][: hdr.payload_len]):
            body = data[fmt.FRAME_HEADER_SIZE + off : fmt.FRAME_HEADER_SIZE + off + ln]
            try:
                rec = fmt.decode_record(typ, body)
            except fmt.FormatError:
                found.append(f"an unreadable record of type {typ}")
                continue
            if isinstance(rec, fmt.Deliver):
                for t in rec.targets:
                    mb = index.mailboxes.get(t.mailbox)
                    acct = index.accounts.get(mb.account) if mb else None
                    where = f"{acct.address if acct else '?'}/{mb.name if mb else '?'}"
                    found.append(f"a delivery to {where} UID {t.uid}")
            else:
                found.append(type(rec).__name__)
    except fmt.FormatError:
        found.append("unreadable records")
    return f"LSN {hdr.lsn}: " + ", ".join(found) if found else ""


def _checkpoints(fs: FileSystem, data_dir: str, report: FsckReport) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    d = os.path.join(data_dir, CHECKPOINT_DIR)
    if not fs.exists(d):
        return out
    for name in fs.listdir(d):
        if not name.endswith(".ckpt"):
            continue
        f = fs.open_read(os.path.join(d, name))
        try:
            data = f.pread(f.size(), 0)
        finally:
            f.close()
        try:
            ck = parse_checkpoint(data)
        except fmt.FormatError as e:
            report.checkpoints.append(f"{name}: unreadable ({e}); it will not be used")
            continue
        out[ck.lsn] = ck.body
    return out


def _compare_checkpoint(index: ix.Index, lsn: int, body: bytes, report: FsckReport) -> None:
    try:
        ck = ix.Index.deserialize(body)
    except fmt.FormatError as e:
        report.checkpoints.append(f"LSN {lsn}: unreadable ({e})")
        return
    # Locations differ legitimately after compaction; compare the logical content.
    if _logical(ck) == _logical(index):
        report.checkpoints.append(f"LSN {lsn}: agrees with the log")
    else:
        report.checkpoints.append(
            f"LSN {lsn}: MISMATCH with the log (it will not be trusted after --repair)"
        )


def _logical(index: ix.Index) -> tuple[object, ...]:
    boxes = sorted(
        (
            m.guid,
            m.account,
            m.name,
            m.uidvalidity,
            m.uidnext,
            m.highestmodseq,
            m.uids.tobytes(),
            m.modseqs.tobytes(),
            m.flags.tobytes(),
            bytes(m.msg_guids),
            tuple(index.blobs.hash_at(s) for s in m.blobs),
        )
        for m in index.mailboxes.values()
    )
    accts = sorted(
        (a.guid, a.address, a.password_hash, a.quota_bytes) for a in index.accounts.values()
    )
    return (
        index.last_lsn,
        tuple(boxes),
        tuple(accts),
        tuple(sorted(index.domains)),
        tuple(sorted(index.aliases.items())),
        tuple(sorted(index.queue)),
    )


def _verify_bodies(fs: FileSystem, logdir: str, index: ix.Index, report: FsckReport) -> None:
    b = index.blobs
    readers: dict[int, object] = {}
    bad: dict[int, str] = {}
    try:
        for s in range(len(b)):
            if b.refs[s] == 0:
                continue
            if not b.has_data(s):
                bad[s] = "body lost"
                continue
            parts = []
            for loc in b.location(s):
                r = readers.get(loc.segno)
                if r is None:
                    r = fs.open_read(segment_path(logdir, loc.segno))
                    readers[loc.segno] = r
                parts.append(r.pread(loc.length, loc.offset))  # type: ignore[attr-defined]
            report.bodies_checked += 1
            if blob_hash(b"".join(parts)) != b.hash_at(s):
                bad[s] = "body checksum mismatch"
    finally:
        for r in readers.values():
            r.close()  # type: ignore[attr-defined]
    report.bad_bodies = {b.hash_at(s) for s in bad}
    if not bad:
        return
    by_acct = {a.guid: a.address for a in index.accounts.values()}
    for mb in index.mailboxes.values():
        for i, slot in enumerate(mb.blobs):
            if slot in bad:
                report.lost_messages.append(
                    LostMessage(by_acct.get(mb.account, "?"), mb.name, mb.uids[i], bad[slot])
                )
    for q in index.queue.values():
        qs = b.slot(q.blob)
        if qs is not None and qs in bad:
            report.lost_messages.append(LostMessage(q.sender, "(outbound queue)", 0, bad[qs]))


def _repair(fs: FileSystem, data_dir: str, report: FsckReport) -> None:
    logdir = os.path.join(data_dir, LOG_DIR)
    by_seg: dict[int, list[Damage]] = {}
    for d in report.damage:
        by_seg.setdefault(d.segno, []).append(d)
    last = max(list_segments(fs, logdir), default=0)
    for segno, damages in sorted(by_seg.items()):
        path = segment_path(logdir, segno)
        f = fs.open_read(path)
        try:
            data = f.pread(f.size(), 0)
        finally:
            f.close()
        hdr: fmt.SegmentHeader | None
        try:
            hdr = fmt.SegmentHeader.decode(data)
        except fmt.FormatError:
            hdr = None
        if hdr is None and damages[0].torn_tail and segno == last and damages[0].lost_lsns == 0:
            fs.unlink(path)
            fs.sync_dir(logdir)
            report.repaired.append(
                f"segment {segno}: unreadable last segment removed "
                "(an interrupted segment creation)"
            )
            continue
        if len(damages) == 1 and damages[0].torn_tail and segno == last and hdr is not None:
            d = damages[0]
            fs.truncate(path, d.offset)
            report.repaired.append(
                f"segment {segno}: torn tail of {d.end - d.offset} bytes truncated"
            )
            continue
        if hdr is None:
            d = damages[0]
            node = b"\0" * 16
            hdr = fmt.SegmentHeader(segno, d.first_lsn, node, now_ms())
            damages = [
                Damage(
                    segno,
                    fmt.SEGMENT_HEADER_SIZE,
                    len(data),
                    d.first_lsn,
                    d.lost_lsns,
                    d.reason,
                    d.torn_tail,
                )
            ]
        out = [
            fmt.SegmentHeader(
                hdr.segno, hdr.first_lsn, hdr.node_id, hdr.created_ms, hdr.rewrites + 1
            ).encode()
        ]
        pos = fmt.SEGMENT_HEADER_SIZE
        for d in sorted(damages, key=lambda x: x.offset):
            out.append(data[pos : d.offset])
            if d.lost_lsns > 0:
                payload = fmt.encode_records([fmt.Hole(d.lost_lsns, d.reason)])
                out.append(
                    fmt.encode_frame(
                        lsn=d.first_lsn,
                        generation=0,
                        node_id=hdr.node_id,
                        time_ms=now_ms(),
                        payload=payload,
                        nrecords=1,
                        kind=fmt.FrameKind.HOLE,
                    )
                )
                report.repaired.append(
                    f"segment {segno}: bytes {d.offset}..{d.end} replaced by a hole for LSNs "
                    f"{d.first_lsn}..{d.first_lsn + d.lost_lsns - 1}"
                )
            else:
                report.repaired.append(
                    f"segment {segno}: {d.end - d.offset} unreadable bytes at the end dropped"
                )
            pos = d.end
        out.append(data[pos:])
        tmp = path + ".repair"
        if fs.exists(tmp):
            fs.unlink(tmp)
        w = fs.open_append(tmp)
        try:
            for part in out:
                w.write(part)
            w.sync()
        finally:
            w.close()
        fs.replace(tmp, path)
        fs.sync_dir(logdir)
    ckdir = os.path.join(data_dir, CHECKPOINT_DIR)
    if fs.exists(ckdir):
        names = [n for n in fs.listdir(ckdir) if n.endswith(".ckpt")]
        for n in names:
            fs.unlink(os.path.join(ckdir, n))
        if names:
            fs.sync_dir(ckdir)
            report.repaired.append(f"{len(names)} checkpoint(s) removed (rebuilt at next open)")


def _expunge_lost(data_dir: str, node_id: bytes, report: FsckReport, index: ix.Index) -> None:
    """Expunge the messages whose body is gone, in one transaction of the repaired store."""
    st = Store.open(data_dir, node_id=node_id, options=StoreOptions())
    try:
        if not report.lost_messages:
            return
        with st.transaction() as t:
            n = 0
            for mb in st.index.mailboxes.values():
                b = st.index.blobs
                dead = [
                    mb.uids[i]
                    for i, s in enumerate(mb.blobs)
                    if not b.has_data(s) or b.hash_at(s) in report.bad_bodies
                ]
                if dead:
                    t.expunge(mb.guid, dead)
                    n += len(dead)
        report.repaired.append(f"{n} message(s) without an intact body expunged")
    finally:
        st.close()
