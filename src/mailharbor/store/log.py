"""Segment files: naming, creation, and scanning frames with torn-tail detection.

Theory of operation
-------------------
Segments live in `<data>/log/segment-<segno:08d>.log`, numbered from 1 without gaps. Only the last
segment is written (appended); the others are sealed and change only by compaction, which rewrites
a whole segment and bumps the header's rewrite counter.

`scan_segment` walks frames from an offset and stops at the first frame that does not verify. It
then classifies the stop: *torn* — nothing verifiable follows in this segment (a crash cut the
last write; the caller truncates it away when it is the last segment), or *corrupt* — a valid frame
with a higher LSN follows, so good data lies beyond damage (read-write open refuses; `fsck
--repair` salvages).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from mailharbor.store import format as fmt
from mailharbor.store.fsio import FileSystem, ReadableFile

SEGMENT_PREFIX = "segment-"
SEGMENT_SUFFIX = ".log"
_READ_BLOCK = 4 * 1024 * 1024


def segment_name(segno: int) -> str:
    return f"{SEGMENT_PREFIX}{segno:08d}{SEGMENT_SUFFIX}"


def list_segments(fs: FileSystem, logdir: str) -> list[int]:
    """Segment numbers present in `logdir`, ascending."""
    out = []
    for name in fs.listdir(logdir):
        if name.startswith(SEGMENT_PREFIX) and name.endswith(SEGMENT_SUFFIX):
            mid = name[len(SEGMENT_PREFIX) : -len(SEGMENT_SUFFIX)]
            if mid.isdigit():
                out.append(int(mid))
    return sorted(out)


@dataclass(frozen=True, slots=True)
class ScannedFrame:
    """A verified frame: its header, payload, and where it lies."""

    header: fmt.FrameHeader
    raw_header: bytes
    payload: bytes
    segno: int
    offset: int  # of the frame header

    @property
    def raw(self) -> bytes:
        """The frame exactly as it lies in the log (what replication ships)."""
        return self.raw_header + self.payload

    @property
    def payload_offset(self) -> int:
        return self.offset + fmt.FRAME_HEADER_SIZE

    @property
    def end(self) -> int:
        return self.offset + fmt.FRAME_HEADER_SIZE + self.header.payload_len

    @property
    def lsn_count(self) -> int:
        """How many LSNs the frame takes (1, or a HOLE's count)."""
        if self.header.kind == fmt.FrameKind.HOLE:
            recs = fmt.decode_records(self.payload)
            if recs and isinstance(recs[0], fmt.Hole):
                return max(1, recs[0].count)
        return 1


@dataclass(frozen=True, slots=True)
class ScanStop:
    """Why a scan stopped before the end of the segment."""

    segno: int
    offset: int
    expected_lsn: int
    reason: str
    torn: bool  # True: nothing valid follows in this segment
    next_valid_offset: int | None  # corrupt only: where the next valid frame starts
    next_valid_lsn: int | None


class _Buffered:
    """Sequential reads through a large buffer over a ReadableFile."""

    def __init__(self, f: ReadableFile, start: int, size: int) -> None:
        self.f = f
        self.size = size
        self.buf = b""
        self.buf_start = start

    def read(self, offset: int, n: int) -> bytes:
        rel = offset - self.buf_start
        if rel < 0 or rel + n > len(self.buf):
            want = max(n, _READ_BLOCK)
            self.buf = self.f.pread(min(want, max(0, self.size - offset)), offset)
            self.buf_start = offset
            rel = 0
        return self.buf[rel : rel + n]


def scan_segment(
    fs: FileSystem,
    path: str,
    segno: int,
    start: int,
    expected_lsn: int,
) -> tuple[Iterator[ScannedFrame], list[ScanStop]]:
    """Return (frames iterator, stops). `stops` is filled when iteration finishes: empty if the
    segment ended cleanly, else one ScanStop describing the first bad frame."""
    stops: list[ScanStop] = []
    return _scan(fs, path, segno, start, expected_lsn, stops), stops


def _scan(
    fs: FileSystem,
    path: str,
    segno: int,
    start: int,
    expected_lsn: int,
    stops: list[ScanStop],
) -> Iterator[ScannedFrame]:
    f = fs.open_read(path)
    try:
        size = f.size()
        r = _Buffered(f, start, size)
        off = start
        lsn = expected_lsn
        while off < size:
            reason = ""
            hdr_bytes = r.read(off, fmt.FRAME_HEADER_SIZE)
            try:
                hdr = fmt.decode_frame_header(hdr_bytes)
            except fmt.FormatError as e:
                reason = str(e)
            else:
                if hdr.lsn != lsn:
                    reason = f"frame LSN {hdr.lsn}, expected {lsn}"
                elif off + fmt.FRAME_HEADER_SIZE + hdr.payload_len > size:
                    reason = "frame payload truncated"
                else:
                    payload = r.read(off + fmt.FRAME_HEADER_SIZE, hdr.payload_len)
                    if fmt.crc32c(payload) != hdr.payload_crc:
                        reason = "frame payload checksum mismatch"
            if reason:
                nxt = find_next_valid(f, size, off + 1, lsn)
                stops.append(
                    ScanStop(
                        segno,
                        off,
                        lsn,
                        reason,
                        nxt is None,
                        nxt[0] if nxt else None,
                        nxt[1] if nxt else None,
                    )
                )
                return
            fr = ScannedFrame(hdr, hdr_bytes, payload, segno, off)
            yield fr
            lsn += fr.lsn_count
            off = fr.end
    finally:
        f.close()


def find_next_valid(f: ReadableFile, size: int, start: int, min_lsn: int) -> tuple[int, int] | None:
    """The (offset, lsn) of the next frame after `start` whose header and payload verify and whose
    LSN is >= min_lsn, or None."""
    off = start
    block = 1 << 20
    while off < size:
        data = f.pread(min(block + fmt.FRAME_HEADER_SIZE, size - off), off)
        i = 0
        while True:
            j = data.find(fmt.FRAME_MAGIC, i)
            if j < 0 or j >= block:
                break
            try:
                hdr = fmt.decode_frame_header(f.pread(fmt.FRAME_HEADER_SIZE, off + j))
            except fmt.FormatError:
                i = j + 1
                continue
            end = off + j + fmt.FRAME_HEADER_SIZE + hdr.payload_len
            if hdr.lsn >= min_lsn and end <= size:
                payload = f.pread(hdr.payload_len, off + j + fmt.FRAME_HEADER_SIZE)
                if fmt.crc32c(payload) == hdr.payload_crc:
                    return off + j, hdr.lsn
            i = j + 1
        off += block
    return None


def segment_path(logdir: str, segno: int) -> str:
    return os.path.join(logdir, segment_name(segno))
