"""Cut the byte ranges a load needs into aligned spans of at most one buffer each.

A span is one read: an aligned file range that lands in one host buffer, and
the pieces of destination tensors it holds. Neighbouring tensors share spans
(a prepared shard has only alignment padding between them, a Hugging Face file
none), so small tensors cost no extra reads; a large tensor spans many.
Aligned starts and lengths let the same plan be read with O_DIRECT.
"""

from dataclasses import dataclass

ALIGNMENT = 4096
# Bytes between two wanted ranges that are read and dropped rather than
# starting a new span: above this, skipping is cheaper than reading.
MAX_GAP = 1 << 20


@dataclass(frozen=True)
class Piece:
    target: int  # index of the destination in the caller's flat list of targets
    buf_offset: int  # where the piece starts in the span's buffer
    dest_offset: int  # where it goes in the destination (bytes)
    nbytes: int


@dataclass(frozen=True)
class Span:
    file: int  # index of the file in the caller's list
    offset: int  # aligned file offset of the read
    length: int  # bytes asked for (aligned; may run past the end of the file)
    needed: int  # bytes that must arrive: the end of the last piece
    pieces: tuple[Piece, ...]


def _down(n: int, a: int) -> int:
    return n // a * a


def _up(n: int, a: int) -> int:
    return -(-n // a) * a


def plan_spans(
    files: list[list[tuple[int, int, int]]],
    span_bytes: int,
    alignment: int = ALIGNMENT,
    max_gap: int = MAX_GAP,
) -> list[Span]:
    """``files[i]`` lists (target, offset, nbytes) wanted from file i; spans come in file order."""
    if span_bytes < alignment or span_bytes % alignment:
        raise ValueError(f"span_bytes must be a positive multiple of {alignment}")
    spans: list[Span] = []
    for file_index, wanted in enumerate(files):
        ranges = sorted((off, off + n, t) for t, off, n in wanted if n > 0)
        group: list[tuple[int, int, int]] = []
        group_end = 0
        for rng in ranges:
            if group and rng[0] - group_end > max_gap:
                spans.extend(_group_spans(file_index, group, span_bytes, alignment))
                group = []
            group.append(rng)
            group_end = max(group_end, rng[1]) if len(group) > 1 else rng[1]
        if group:
            spans.extend(_group_spans(file_index, group, span_bytes, alignment))
    return spans


def _group_spans(file_index, group, span_bytes, alignment) -> list[Span]:
    start = _down(group[0][0], alignment)
    end = _up(max(hi for _, hi, _ in group), alignment)
    pieces: dict[int, list[Piece]] = {}
    for lo, hi, target in group:
        for k in range((lo - start) // span_bytes, (hi - 1 - start) // span_bytes + 1):
            s = start + k * span_bytes
            a, b = max(lo, s), min(hi, s + span_bytes)
            pieces.setdefault(k, []).append(Piece(target, a - s, a - lo, b - a))
    spans = []
    for k in sorted(pieces):
        s = start + k * span_bytes
        ps = tuple(pieces[k])
        spans.append(Span(
            file=file_index,
            offset=s,
            length=min(span_bytes, end - s),
            needed=max(p.buf_offset + p.nbytes for p in ps),
            pieces=ps,
        ))
    return spans
