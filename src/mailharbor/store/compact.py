"""Compaction: reclaim the bytes of bodies nobody references any more.

Theory of operation
-------------------
Compaction is node-local and never changes the logical log: every frame keeps its LSN,
generation, writer and record count. In a sealed segment, each BLOB, CHUNK or MIME_META record
whose data is dead is replaced by a RECLAIMED record holding the original's head (hash or stream
id) without the data. Dead means: the blob has no references (refs == 0), or the index points at
a newer copy, or a chunk belongs to a stream whose BLOB never committed and which no open
transaction is still writing (an orphan).

Each segment is rewritten to a temporary file, fsynced, renamed over the original and the
directory fsynced, with the header's rewrite counter bumped; then the index's locations are moved
to the new offsets. A crash leaves either the old or the new segment, both valid. Checkpoints
record each segment's rewrite counter, so one taken before a rewrite is never trusted after it
(open falls back to a full replay); compaction ends by writing a fresh checkpoint.

Only the active segment is never compacted, nor any frame with LSN >= `Store.retain_from` (what
the replication peer has not acknowledged yet: it may still have to be shipped as written). The
caller has settled all pending commits.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

from mailharbor.store import format as fmt
from mailharbor.store import index as ix
from mailharbor.store.log import scan_segment, segment_path

if TYPE_CHECKING:
    from mailharbor.store.store import CompactReport, Store


_RECLAIMED_OVERHEAD = 13
"""A RECLAIMED body is the original's head plus 13 bytes (type u8, head length u32, data length
u64): dead data no larger than that stays, so compaction never grows the log."""


def compact_store(st: Store) -> CompactReport:
    from mailharbor.store.store import CompactReport, CorruptLog

    b = st.index.blobs
    live: set[tuple[int, int]] = set()
    for s in range(len(b)):
        if b.refs[s] == 0 or not b.has_data(s):
            continue
        for loc in b.location(s):
            live.add((loc.segno, loc.offset))
        if b.meta_len[s]:
            live.add((b.meta_seg[s], b.meta_off[s]))
    open_streams = set(st._open_streams)
    for stream, parts in b.pending_chunks.items():
        if stream in open_streams:
            for loc in parts.values():
                live.add((loc.segno, loc.offset))

    before = after = 0
    rewritten = blobs_reclaimed = chunks_reclaimed = 0
    moves: dict[tuple[int, int], int] = {}
    rewritten_segs: set[int] = set()
    for segno in sorted(st._segments):
        if segno >= st._active_segno:
            continue
        path = segment_path(st._logdir, segno)
        size = st._segment_size(segno)
        before += size
        hdr = st._segments[segno]
        frames, stops = scan_segment(st.fs, path, segno, fmt.SEGMENT_HEADER_SIZE, hdr.first_lsn)
        out: list[bytes] = []
        pos = fmt.SEGMENT_HEADER_SIZE
        seg_moves: dict[tuple[int, int], int] = {}
        dead_here = 0
        nb = nc = 0
        for fr in frames:
            if fr.header.kind != fmt.FrameKind.TXN:
                out.append(fr.raw)
                pos += len(fr.raw)
                continue
            retained = fr.header.lsn >= st.retain_from
            new_parts: list[bytes] = []
            changed = False
            new_off = 0
            pending_moves: list[tuple[int, int]] = []  # (old data offset, offset in payload)
            for typ, off, ln in fmt.iter_record_spans(fr.payload):
                body = fr.payload[off : off + ln]
                head_len = (
                    fmt.DATA_HEAD_LEN.get(fmt.RecordType(typ))
                    if typ in (fmt.RecordType.BLOB, fmt.RecordType.CHUNK, fmt.RecordType.MIME_META)
                    else None
                )
                chunked_blob = (
                    typ == fmt.RecordType.BLOB and int.from_bytes(body[40:44], "little") > 0
                )
                if head_len is None or chunked_blob:
                    rec_bytes = fmt.encode_records([fmt.decode_record(typ, body)])
                    new_parts.append(rec_bytes)
                    new_off += len(rec_bytes)
                    continue
                data_off = fr.payload_offset + off + head_len
                # Tiny dead data is kept: its RECLAIMED record would not be smaller. Frames the
                # peer has not acknowledged (LSN >= retain_from) are kept whole.
                if retained or (segno, data_off) in live or ln <= head_len + _RECLAIMED_OVERHEAD:
                    pending_moves.append((data_off, new_off + fmt.RECORD_HEADER_SIZE + head_len))
                    rec_bytes = fmt.encode_records([fmt.decode_record(typ, body)])
                else:
                    changed = True
                    dead_here += ln - head_len
                    if typ == fmt.RecordType.BLOB:
                        nb += 1
                    elif typ == fmt.RecordType.CHUNK:
                        nc += 1
                    rec_bytes = fmt.encode_records(
                        [fmt.Reclaimed(typ, bytes(body[:head_len]), ln - head_len)]
                    )
                new_parts.append(rec_bytes)
                new_off += len(rec_bytes)
            payload = b"".join(new_parts) if changed else fr.payload
            frame = fmt.encode_frame(
                lsn=fr.header.lsn,
                generation=fr.header.generation,
                node_id=fr.header.node_id,
                time_ms=fr.header.time_ms,
                payload=payload,
                nrecords=fr.header.nrecords,
            )
            if not changed:
                # Same payload: offsets inside the frame are unchanged.
                pending_moves = [(o, o - fr.payload_offset) for o, _ in pending_moves]
            for old, rel in pending_moves:
                seg_moves[(segno, old)] = pos + fmt.FRAME_HEADER_SIZE + rel
            out.append(frame)
            pos += len(frame)
        if stops:
            raise CorruptLog(f"segment {segno}: {stops[0].reason}; run `mailharbor store fsck`")
        if not dead_here:
            after += size
            continue
        new_hdr = fmt.SegmentHeader(
            hdr.segno, hdr.first_lsn, hdr.node_id, hdr.created_ms, hdr.rewrites + 1
        )
        tmp = path + ".compact"
        if st.fs.exists(tmp):
            st.fs.unlink(tmp)
        f = st.fs.open_append(tmp)
        try:
            f.write(new_hdr.encode())
            for chunk in out:
                f.write(chunk)
            f.sync()
        finally:
            f.close()
        st.fs.replace(tmp, path)
        st.fs.sync_dir(st._logdir)
        st._segments[segno] = new_hdr
        r = st._readers.pop(segno, None)
        if r is not None:
            r.close()
        after += pos
        rewritten += 1
        blobs_reclaimed += nb
        chunks_reclaimed += nc
        moves.update(seg_moves)
        rewritten_segs.add(segno)

    if rewritten_segs:
        _relocate(b, rewritten_segs, moves)
        st._cache.clear()
        st.checkpoint()
    return CompactReport(rewritten, before, after, blobs_reclaimed, chunks_reclaimed)


def _relocate(b: ix.BlobTable, segs: set[int], moves: dict[tuple[int, int], int]) -> None:
    """Point the index at the rewritten segments; forget data that was reclaimed."""
    for s in range(len(b)):
        if b.has_data(s) and s in b.chunks:
            locs = b.chunks[s]
            new_locs: list[ix.Location] = []
            for loc in locs:
                if loc.segno in segs:
                    n = moves.get((loc.segno, loc.offset))
                    if n is None:
                        new_locs = []
                        break
                    loc = ix.Location(loc.segno, n, loc.length)
                new_locs.append(loc)
            if new_locs:
                b.chunks[s] = new_locs
                b.seg[s], b.off[s] = new_locs[0].segno, new_locs[0].offset
            else:
                b.drop_data(s)
        elif b.has_data(s) and b.seg[s] in segs:
            n = moves.get((b.seg[s], b.off[s]))
            if n is None:
                b.drop_data(s)
            else:
                b.off[s] = n
        if b.meta_len[s] and b.meta_seg[s] in segs:
            n = moves.get((b.meta_seg[s], b.meta_off[s]))
            if n is None:
                b.meta_seg[s] = b.meta_off[s] = b.meta_len[s] = 0
            else:
                b.meta_off[s] = n
    for stream in list(b.pending_chunks):
        parts = b.pending_chunks[stream]
        for i, loc in list(parts.items()):
            if loc.segno in segs:
                n = moves.get((loc.segno, loc.offset))
                if n is None:
                    del parts[i]
                else:
                    parts[i] = ix.Location(loc.segno, n, loc.length)
        if not parts:
            with contextlib.suppress(KeyError):
                del b.pending_chunks[stream]
