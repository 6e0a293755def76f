"""Hypothesis strategies shared by the property tests of the format readers."""

from __future__ import annotations

from hypothesis import strategies as st

KINDS = ("flip", "insert", "delete", "truncate")


@st.composite
def byte_mutations(draw, blob: bytes, *, rounds: int, kinds: tuple[str, ...] = KINDS,
                   longest_delete: int = 4) -> bytes:
    """``blob`` after 1 to ``rounds`` random edits of the ``kinds`` given: a bit flipped, 1-4
    bytes inserted, 1 to ``longest_delete`` bytes deleted, the rest cut off, or 4 bytes zeroed."""
    data = bytearray(blob)
    for _ in range(draw(st.integers(1, rounds))):
        kind = draw(st.sampled_from(kinds))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "zero":
            data[at:at + 4] = b"\0" * len(data[at:at + 4])
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete":
            del data[at:at + draw(st.integers(1, longest_delete))]
        elif kind == "truncate":
            del data[at:]
    return bytes(data)
