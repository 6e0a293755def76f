"""Names are data, never control: how a path reaches a terminal or a JSON document.

Paths are ``str`` everywhere in ckpt-tools. A name that is not UTF-8 arrives as Python's
surrogateescape form (``os.fsdecode``: byte 0xff is U+DCFF), which the file system calls
take back unchanged but which no strict UTF-8 writer or JSON parser accepts; and a name may
hold terminal escapes or a newline. Everything said about names leaves through one of two
functions, at the edge (the output sink, the JSON writer, the ``--log`` encoder):

* ``shown(text)`` for people: every control character as a visible escape;
* ``json_text(encode, doc)`` for machines: ``encode(doc)`` with no lone surrogate (the
  exact bytes of such a name kept beside it, see ``json_safe``) and no raw character that a
  terminal obeys (``cat`` of a log is safe too).
"""

from __future__ import annotations

import re

# C0, DEL, C1 (which holds the 8-bit CSI and OSC), the Unicode line and paragraph
# separators, and lone surrogates (a byte that was not UTF-8, or a stray escape)
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_SURROGATE = re.compile("[\ud800-\udfff]")
# what a JSON encoder leaves raw (it escapes C0 itself) that a terminal may act on
_JSON_RAW_CONTROL = re.compile("[\x7f-\x9f\u2028\u2029]")
_JSON_CARE = re.compile("[\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
BYTES_SUFFIX = "_bytes_b64"
_PRINTABLE_ASCII = bytes(range(0x20, 0x7F))


def _plain(text: str, newlines: int) -> bool:
    """Printable ASCII and exactly ``newlines`` newlines: the usual text, told at C speed."""
    if not text.isascii():
        return False
    return text.encode("ascii").translate(None, _PRINTABLE_ASCII) == b"\n" * newlines


def _escape(match: re.Match) -> str:
    c = match.group()
    named = _NAMED.get(c)
    if named is not None:
        return named
    code = ord(c)
    if 0xDC80 <= code <= 0xDCFF:     # surrogateescape: the byte the file system holds
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def shown(text: str) -> str:
    """``text`` for a terminal: control characters as ``\\n``, ``\\r``, ``\\t``, ``\\xNN``
    (ESC is ``\\x1b``), an undecodable byte as ``\\xNN``, U+2028/2029 as ``\\uNNNN``.

    What it returns holds none of them, so a name can neither move the cursor, change
    colours nor start a line; it is its own fixed point (``shown(shown(t)) == shown(t)``).
    """
    if text.isprintable():   # the usual case, at C speed: none of them is printable
        return text
    return _UNSAFE.sub(_escape, text)


def shown_lines(lines) -> str:
    """Lines a renderer built, each through ``shown``, joined by the only newlines meant."""
    lines = list(lines)
    text = "\n".join(lines)
    if _plain(text, len(lines) - 1):   # the usual case: one check for all the lines
        return text
    return "\n".join(map(shown, lines))


def _exact_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")   # a file name: its bytes on disk
    except UnicodeEncodeError:                            # a surrogate no byte stands for
        return text.encode("utf-8", "surrogatepass")


def _readable(text: str) -> str:
    return _SURROGATE.sub("\ufffd", text)


def json_safe(value):
    """``value`` (dicts, lists, scalars) with no lone surrogate left, for a strict JSON writer.

    A string holding one gets U+FFFD in place of each (for people and ``grep``); where it is
    the value of a field ``F`` of an object, a field ``F_bytes_b64`` beside it holds its exact
    bytes in base64 (``base64.b64decode`` gives the name as the file system has it). Lists'
    strings and objects' keys get the U+FFFD form only. Strings without a surrogate, and
    everything that is not a string, are left as they are.
    """
    if isinstance(value, str):
        return _readable(value) if _SURROGATE.search(value) else value
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if isinstance(key, str) and _SURROGATE.search(key):
                key = _readable(key)
            if isinstance(item, str) and _SURROGATE.search(item):
                import base64   # only for such a name: --help and a plain audit go without
                out[key] = _readable(item)
                out[f"{key}{BYTES_SUFFIX}"] = base64.b64encode(_exact_bytes(item)).decode("ascii")
            else:
                out[key] = json_safe(item)
        return out
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_text(encode, doc) -> str:
    """``encode(doc)`` (a JSON encoder without ``ensure_ascii``), as valid UTF-8 that a strict
    parser takes and a terminal cannot act on.

    The document is walked with ``json_safe`` only when its text holds a lone surrogate; DEL,
    C1 and U+2028/2029 become ``\\uNNNN`` escapes in the text (they can only stand inside a
    JSON string, where the escape means the same character).
    """
    text = encode(doc)
    # an encoder writes C0 escaped: the newlines of a layout are all there can be raw
    if _plain(text, text.count("\n")) or _JSON_CARE.search(text) is None:
        return text
    if _SURROGATE.search(text) is not None:
        text = encode(json_safe(doc))
    return _JSON_RAW_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


__all__ = ["shown", "shown_lines", "json_safe", "json_text", "BYTES_SUFFIX"]
