"""The framework-free safetensors header reader against real and hostile files."""

from __future__ import annotations

import errno
import json
import os
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from mutations import byte_mutations
from safetensors import safe_open
from safetensors.torch import save, save_file

from ckpt_tools.formats import safetensors_header as sh
from ckpt_tools.formats.safetensors_header import (
    DTYPE_BITS, SafetensorsHeader, parse_header, read_header)
from ckpt_tools.problems import BAD_HEADER, DTYPE_UNKNOWN, TRUNCATED, FormatError

TENSORS = {
    "model.layers.0.q_proj.lora_A.weight": torch.randn(4, 16),
    "model.layers.0.q_proj.lora_B.weight": torch.randn(16, 4).to(torch.bfloat16),
    "half": torch.ones(3, 5, dtype=torch.float16),
    "ids": torch.arange(7, dtype=torch.int64),
    "mask": torch.tensor([True, False, True]),
    "bytes": torch.arange(5, dtype=torch.uint8),
    "fp8": torch.zeros(6).to(torch.float8_e4m3fn),
    "empty": torch.zeros(0, 8),
    "scalar": torch.tensor(2.5, dtype=torch.float64),
}


def _raw(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _assemble(header: dict | bytes, data: bytes = b"") -> bytes:
    """A file with this header (JSON-encoded, space-padded like safetensors) and data."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _split(blob: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack_from("<Q", blob)
    return json.loads(blob[8:8 + n]), blob[8 + n:]


@pytest.fixture(scope="module")
def real_blob() -> bytes:
    return save({"w": torch.randn(3, 4), "b": torch.zeros(3, dtype=torch.bfloat16)},
                metadata={"format": "pt"})


def _edited(blob: bytes, edit) -> bytes:
    header, data = _split(blob)
    result = edit(header, data)
    return _assemble(*result) if isinstance(result, tuple) else _assemble(header, data)


def _reference_accepts(blob: bytes, tmp: Path) -> bool:
    path = tmp / "ref.safetensors"
    path.write_bytes(blob)
    try:
        with safe_open(str(path), framework="pt") as f:
            list(f.keys())
        return True
    except Exception:
        return False


# --- real files --------------------------------------------------------------------

def test_real_file_agrees_with_safe_open(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    save_file(TENSORS, str(path), metadata={"format": "pt", "note": "ünï"})

    header = read_header(path)

    assert header.file_size == path.stat().st_size
    assert header.metadata == {"format": "pt", "note": "ünï"}
    blob = path.read_bytes()
    with safe_open(str(path), framework="pt") as f:
        assert sorted(header.names) == sorted(f.keys())
        for name in f.keys():
            entry = header.get(name)
            assert entry.dtype == f.get_slice(name).get_dtype()
            assert list(entry.shape) == f.get_slice(name).get_shape()
            assert entry.nbytes == entry.end - entry.begin == TENSORS[name].nbytes
            assert entry.numel == TENSORS[name].numel()
            start = header.data_start + entry.begin
            assert blob[start:header.data_start + entry.end] == _raw(TENSORS[name])
    assert header.data_bytes == sum(t.nbytes for t in TENSORS.values())
    assert header.get("absent") is None


def test_empty_state_dict_and_header_order(tmp_path):
    header = parse_header(save({}), len(save({})))
    assert header.tensors == () and header.metadata is None and header.data_bytes == 0

    blob = _assemble({"z": {"dtype": "U8", "shape": [1], "data_offsets": [1, 2]},
                      "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}, b"xy")
    assert parse_header(blob, len(blob)).names == ("z", "a")


def test_legal_corner_cases():
    data = b"\0" * 4
    zero_sized = _assemble({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                            "z1": {"dtype": "F32", "shape": [0, 3], "data_offsets": [4, 4]},
                            "z0": {"dtype": "I64", "shape": [5, 0], "data_offsets": [0, 0]}},
                           data)
    header = parse_header(zero_sized, len(zero_sized))
    assert [t.nbytes for t in header.tensors] == [4, 0, 0]

    null_metadata = _assemble({"__metadata__": None}, b"")
    assert parse_header(null_metadata, len(null_metadata)).metadata is None

    newline_padded = _assemble(b'{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}\n\t ', b"ab")
    assert parse_header(newline_padded, len(newline_padded)).names == ("a",)

    fp4 = _assemble({"q": {"dtype": "F4", "shape": [2, 3], "data_offsets": [0, 3]}}, b"abc")
    assert parse_header(fp4, len(fp4)).get("q").nbytes == 3


def test_every_dtype_the_library_writes_is_known(tmp_path):
    # (The differential property test below shows the library knows every dtype we accept.)
    import safetensors.torch as st_torch

    dtypes = [d for d in st_torch._SIZE if d is not None]
    path = tmp_path / "all.safetensors"
    save_file({str(d): torch.zeros(16, dtype=torch.uint8).view(d) for d in dtypes}, str(path))

    header = read_header(path)

    assert len(header.tensors) == len(dtypes)
    for d in dtypes:
        entry = header.get(str(d))
        assert entry.dtype in DTYPE_BITS and entry.nbytes == 16


# --- hostile files -----------------------------------------------------------------

def _entry(dtype="F32", shape=(1,), offsets=(0, 4)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


HOSTILE = {
    # name: (bytes, expected code, whether the safetensors library also rejects it)
    "empty file": (b"", TRUNCATED, True),
    "under 8 bytes": (b"\x10\0\0", TRUNCATED, True),
    "length past EOF": (struct.pack("<Q", 500) + b"{}", TRUNCATED, True),
    "length near 2**64": (struct.pack("<Q", 2**64 - 3) + b"{}" * 8, BAD_HEADER, True),
    "length over 100 MB": (struct.pack("<Q", 100_000_001) + b" " * 64, BAD_HEADER, True),
    "not UTF-8": (_assemble(b'{"\xff\xfe": 1}'), BAD_HEADER, True),
    "not JSON": (_assemble(b"{this is not json}"), BAD_HEADER, True),
    "JSON array": (_assemble(b"[1, 2, 3]"), BAD_HEADER, True),
    # The format says the header MUST begin with '{'; the library does not enforce it.
    "leading space": (_assemble(b' {"a": ' + json.dumps(_entry()).encode() + b"}",
                                b"\0" * 4), BAD_HEADER, False),
    "NaN in JSON": (_assemble(b'{"__metadata__": {"a": NaN}}'), BAD_HEADER, True),
    "deeply nested": (_assemble(b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"),
                      BAD_HEADER, True),
    "huge integer": (_assemble(b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, '
                               + b"9" * 5000 + b"]}}"), BAD_HEADER, True),
    "duplicate key": (_assemble(b'{"a": ' + json.dumps(_entry()).encode() + b', "a": '
                                + json.dumps(_entry()).encode() + b"}", b"\0" * 4),
                      BAD_HEADER, False),
    "metadata value not str": (_assemble({"__metadata__": {"epoch": 3}}), BAD_HEADER, True),
    "metadata not a dict": (_assemble({"__metadata__": ["a"]}), BAD_HEADER, True),
    "entry not an object": (_assemble({"a": [1, 2]}), BAD_HEADER, True),
    "entry missing field": (_assemble({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4),
                            BAD_HEADER, True),
    "entry extra field": (_assemble({"a": {**_entry(), "crc": 1}}, b"\0" * 4), BAD_HEADER, False),
    "unknown dtype": (_assemble({"a": _entry(dtype="F128")}, b"\0" * 4), DTYPE_UNKNOWN, True),
    "dtype not a string": (_assemble({"a": _entry(dtype=32)}, b"\0" * 4), BAD_HEADER, True),
    "negative shape": (_assemble({"a": _entry(shape=(-1, -4))}, b"\0" * 4), BAD_HEADER, True),
    "shape of floats": (_assemble({"a": _entry(shape=(1.0,))}, b"\0" * 4), BAD_HEADER, True),
    "bool as dim": (_assemble({"a": _entry(shape=(True,))}, b"\0" * 4), BAD_HEADER, True),
    "bool as offset": (_assemble({"a": _entry(dtype="U8", offsets=(False, True))}, b"\0"),
                       BAD_HEADER, True),
    "overflowing shape": (_assemble({"a": _entry(shape=(2**40, 2**40), offsets=(0, 0))}),
                          BAD_HEADER, True),
    "dim past u64 beside a zero": (_assemble({"a": _entry(shape=(0, 2**70), offsets=(0, 0))}),
                                   BAD_HEADER, True),
    "shape x dtype != span": (_assemble({"a": _entry(shape=(2,), offsets=(0, 4))}, b"\0" * 4),
                              BAD_HEADER, True),
    "sub-byte dtype, partial byte": (_assemble({"a": _entry("F4", (3,), (0, 2))}, b"\0" * 2),
                                     BAD_HEADER, True),
    "begin > end": (_assemble({"a": _entry(shape=(0,), offsets=(4, 0))}, b"\0" * 4),
                    BAD_HEADER, True),
    "offsets are three": (_assemble({"a": {**_entry(), "data_offsets": [0, 4, 8]}}, b"\0" * 4),
                          BAD_HEADER, True),
    "overlapping offsets": (_assemble({"a": _entry(offsets=(0, 4)),
                                       "b": _entry(shape=(2,), offsets=(2, 10))}, b"\0" * 10),
                            BAD_HEADER, True),
    "gap": (_assemble({"a": _entry(offsets=(0, 4)), "b": _entry(offsets=(8, 12))}, b"\0" * 12),
            BAD_HEADER, True),
    "offsets not from 0": (_assemble({"a": _entry(offsets=(4, 8))}, b"\0" * 8), BAD_HEADER, True),
    "trailing bytes": (_assemble({"a": _entry()}, b"\0" * 5), BAD_HEADER, True),
    "truncated data": (_assemble({"a": _entry(shape=(4,), offsets=(0, 16))}, b"\0" * 15),
                       TRUNCATED, True),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_header_is_rejected_with_its_code(name, tmp_path):
    blob, code, reference_rejects = HOSTILE[name]

    with pytest.raises(FormatError) as parsed:
        parse_header(blob, len(blob))
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    with pytest.raises(FormatError) as read:
        read_header(path)

    assert parsed.value.code == read.value.code == code
    assert parsed.value.message and "\n" not in parsed.value.message
    if name not in ("deeply nested", "huge integer"):  # the Rust parser may take those
        assert _reference_accepts(blob, tmp_path) is not reference_rejects


def test_duplicate_key_is_accepted_by_safetensors_but_not_by_us(tmp_path):
    blob, _, _ = HOSTILE["duplicate key"]
    path = tmp_path / "dup.safetensors"
    path.write_bytes(blob)
    with safe_open(str(path), framework="pt") as f:  # the library keeps one of the two
        assert list(f.keys()) == ["a"]
    with pytest.raises(FormatError, match="duplicate key 'a'") as err:
        read_header(path)
    assert err.value.code == BAD_HEADER


def test_edits_of_a_real_file(real_blob):
    def metadata_int(h, d):
        h["__metadata__"]["format"] = 1

    def lie_about_shape(h, d):
        h["w"]["shape"] = [4, 4]

    def drop_a_tensor(h, d):
        del h["b"]

    cases = [(metadata_int, BAD_HEADER), (lie_about_shape, BAD_HEADER),
             (drop_a_tensor, BAD_HEADER)]
    for edit, code in cases:
        blob = _edited(real_blob, edit)
        with pytest.raises(FormatError) as err:
            parse_header(blob, len(blob))
        assert err.value.code == code, edit.__name__
    cut = real_blob[:-1]
    with pytest.raises(FormatError) as err:
        parse_header(cut, len(cut))
    assert err.value.code == TRUNCATED


# --- reading: one pread, never the data --------------------------------------------

def _count_preads(monkeypatch):
    calls = []
    real = os.pread

    def spy(fd, size, offset):
        out = real(fd, size, offset)
        calls.append((size, offset, len(out)))
        return out

    monkeypatch.setattr(sh.os, "pread", spy)
    return calls


def test_read_header_reads_one_block_and_no_tensor_data(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_file({"big": torch.zeros(1024, 1024)}, str(path))  # 4 MiB of data
    calls = _count_preads(monkeypatch)

    header = read_header(path)

    assert header.get("big").nbytes == 4 * 1024 * 1024
    assert len(calls) == 1 and calls[0][:2] == (sh.FIRST_READ_BYTES, 0)


def test_read_header_reads_a_long_header_in_two_preads(tmp_path, monkeypatch):
    path = tmp_path / "many.safetensors"
    tensors = {f"base_model.model.layers.{i}.mlp.lora_A.weight": torch.zeros(1) for i in range(2000)}
    save_file(tensors, str(path))
    calls = _count_preads(monkeypatch)

    header = read_header(path)

    assert header.header_len > sh.FIRST_READ_BYTES and len(header.tensors) == 2000
    assert len(calls) == 2
    assert sum(n for _, _, n in calls) == header.data_start  # exactly the header, no data


def test_read_header_falls_back_without_noatime_and_closes_fds(tmp_path, monkeypatch, real_blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(real_blob)
    real_open = os.open
    opened = []

    def open_like_a_foreign_file(p, flags, *args):
        if flags & getattr(os, "O_NOATIME", 0):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        fd = real_open(p, flags, *args)
        opened.append(fd)
        return fd

    monkeypatch.setattr(sh.os, "open", open_like_a_foreign_file)
    fds_before = set(os.listdir("/proc/self/fd"))
    assert read_header(path).names == ("w", "b")
    path.write_bytes(real_blob[:-3])
    with pytest.raises(FormatError):
        read_header(path)

    assert len(opened) == 2
    assert set(os.listdir("/proc/self/fd")) == fds_before


def test_read_header_propagates_os_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_header(tmp_path / "missing.safetensors")


def test_read_header_with_a_stale_size_reports_truncation(tmp_path, real_blob):
    path = tmp_path / "x.safetensors"
    path.write_bytes(real_blob[:20])
    with pytest.raises(FormatError) as err:
        read_header(path, file_size=len(real_blob))  # the file shrank since it was stat'ed
    assert err.value.code == TRUNCATED


# --- properties --------------------------------------------------------------------

def _check_invariants(header: SafetensorsHeader, file_size: int) -> None:
    assert header.file_size == file_size
    spans = sorted((t.begin, t.end) for t in header.tensors)
    position = 0
    for begin, end in spans:
        assert begin == position
        position = end
    assert header.data_start + position == file_size
    for t in header.tensors:
        assert t.end - t.begin == t.nbytes and t.dtype in DTYPE_BITS


def _parse_or_format_error(blob: bytes) -> SafetensorsHeader | None:
    try:
        header = parse_header(blob, len(blob))
    except FormatError as exc:
        assert exc.code in (TRUNCATED, BAD_HEADER, DTYPE_UNKNOWN)
        assert exc.message and "\n" not in exc.message
        return None
    _check_invariants(header, len(blob))
    return header


@pytest.mark.fuzz
@settings(max_examples=1500, deadline=None)
@given(st.one_of(st.binary(max_size=200),
                 st.binary(max_size=200).map(lambda b: struct.pack("<Q", len(b)) + b)))
def test_arbitrary_bytes_give_a_header_or_a_format_error(blob):
    _parse_or_format_error(blob)


_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                          st.floats(allow_nan=False), st.text(max_size=6))
_json_values = st.recursive(_json_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=4), inner, max_size=4)),
    max_leaves=8)
_dims = st.lists(st.one_of(st.integers(0, 6), st.integers(-2, 2**65), st.booleans()), max_size=3)
_entries = st.fixed_dictionaries(
    {"dtype": st.one_of(st.sampled_from(sorted(DTYPE_BITS)), st.sampled_from(["F128", "f32"]),
                        _json_scalars),
     "shape": st.one_of(_dims, _json_values),
     "data_offsets": st.one_of(st.lists(st.integers(-1, 200), min_size=2, max_size=2),
                               _json_values)},
    optional={"extra": _json_values})


@st.composite
def _headers(draw):
    """Headers that are valid more often than not, and wrong in every way otherwise."""
    header: dict = {}
    position = 0
    for i in range(draw(st.integers(0, 4))):
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        numel = 1
        for d in shape:
            numel *= d
        nbytes = -(-numel * DTYPE_BITS[dtype] // 8)
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [position, position + nbytes]}
        position += nbytes
    if draw(st.booleans()):
        header[draw(st.text(max_size=3))] = draw(_entries)
    if draw(st.booleans()):
        header["__metadata__"] = draw(st.one_of(
            st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=3), _json_values))
    return header, position + draw(st.sampled_from([0, 0, 0, 1, -1]))


@pytest.mark.fuzz
@settings(max_examples=700, deadline=None)
@given(_headers())
def test_generated_headers_give_a_header_or_a_format_error(case):
    header, data_len = case
    blob = _assemble(header, b"\0" * max(data_len, 0))
    _parse_or_format_error(blob)


_tmp = tempfile.TemporaryDirectory(prefix="st-differential-")


@pytest.mark.fuzz
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_headers())
def test_generated_headers_agree_with_the_safetensors_library(case):
    header, data_len = case
    assume(data_len >= 0)
    blob = _assemble(header, b"\0" * data_len)
    ours = _parse_or_format_error(blob)
    reference = _reference_accepts(blob, Path(_tmp.name))
    stricter = any(isinstance(v, dict) and "extra" in v for v in header.values())
    if ours is not None:
        assert reference
    elif reference:
        assert stricter, "we reject a header the safetensors library accepts"


def _mutations(blob: bytes):
    return byte_mutations(blob, rounds=4)


_REAL = save({"w": torch.randn(2, 3), "b": torch.zeros(2, dtype=torch.bfloat16),
              "e": torch.zeros(0)}, metadata={"format": "pt"})


@pytest.mark.fuzz
@settings(max_examples=1000, deadline=None)
@given(_mutations(_REAL))
def test_mutated_real_file_gives_a_header_or_a_format_error(blob):
    header = _parse_or_format_error(blob)
    if header is not None and len(blob) == len(_REAL) and blob[:header.data_start] == \
            _REAL[:header.data_start]:
        assert header == parse_header(_REAL, len(_REAL))  # only tensor bytes changed


@pytest.mark.fuzz
@settings(max_examples=150, deadline=None)
@given(st.one_of(_mutations(_REAL), st.binary(max_size=100)))
def test_read_header_agrees_with_parse_header(blob):
    path = Path(_tmp.name) / "mutated.safetensors"
    path.write_bytes(blob)
    try:
        expected = parse_header(blob, len(blob))
    except FormatError as exc:
        with pytest.raises(FormatError) as err:
            read_header(path)
        assert err.value.code == exc.code
    else:
        assert read_header(path) == expected
