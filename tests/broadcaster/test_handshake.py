"""The opening handshake's plain parts: the request's head cut from what follows it."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from broadcaster import handshake

HEAD = b"GET / HTTP/1.1\r\nHost: example\r\nUpgrade: websocket\r\n\r\n"


@given(
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=len(HEAD) + 40), max_size=8),
)
def test_the_head_is_cut_from_what_follows_however_the_reads_split(
    after: bytes, cuts: list[int]
) -> None:
    """Fed in reads split anywhere, even inside the head's end, exactly the head is parsed
    and what follows it is kept, however it starts."""
    data = HEAD + after
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    reads = [data[start:end] for start, end in itertools.pairwise(bounds)]
    parsed, tail, early, later = b"", b"", None, b""
    for n, read in enumerate(reads):
        head, tail, early = handshake.cut_head(tail, read)
        parsed += head
        if parsed.endswith(b"\r\n\r\n"):  # the request is parsed: nothing more is cut
            later = b"".join(reads[n + 1 :])
            break
    assert parsed == HEAD
    assert (early or b"") + later == after
