"""torch.save files inspected without unpickling."""

from __future__ import annotations

import builtins
import datetime
import io
import logging
import os
import pickle
import pickletools
import struct
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections import OrderedDict
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from mutations import KINDS, byte_mutations

from ckpt_tools.formats import torchsave
from ckpt_tools.formats.torchsave import (
    ALLOWED_GLOBALS, TensorRef, TorchFileInfo, TorchSymbol, flatten_tensors, inspect_torch_file)
from ckpt_tools.problems import BAD_ARCHIVE, TRUNCATED, UNSAFE_PICKLE, FormatError
from ckpt_tools.read_cache import BoundedMemo, ReadCache

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["zip", "legacy"]


def _save(path: Path, obj, fmt: str = "zip", protocol: int = 2) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=(fmt == "zip"),
               pickle_protocol=protocol)
    return path


def _code(path: Path, **kwargs) -> str:
    with pytest.raises(FormatError) as err:
        inspect_torch_file(path, **kwargs)
    assert err.value.message and "\n" not in err.value.message
    return err.value.code


def _describe(x, tensor):
    """``x`` with every tensor replaced by ``tensor(x)`` (None: not a tensor), containers kept."""
    described = tensor(x)
    if described is not None:
        return described
    if isinstance(x, dict):
        return {k: _describe(v, tensor) for k, v in x.items()}
    if isinstance(x, list):
        return [_describe(v, tensor) for v in x]
    if isinstance(x, tuple):
        return tuple(_describe(v, tensor) for v in x)
    return x


def _describe_loaded(x):
    """What torch.load gave, in the terms of the inspector."""
    return _describe(x, lambda t: ("tensor", str(t.dtype).removeprefix("torch."), tuple(t.shape),
                                   t.stride(), t.storage_offset())
                     if isinstance(t, torch.Tensor) else None)


def _describe_inspected(x):
    return _describe(x, lambda t: ("tensor", t.dtype, t.shape, t.stride, t.storage_offset)
                     if isinstance(t, TensorRef) else None)


def _storage_sizes(loaded) -> list[int]:
    seen = {}
    stack = [loaded]
    while stack:
        x = stack.pop()
        if isinstance(x, torch.Tensor):
            seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return sorted(seen.values())


def _objects():
    base = torch.arange(20.0)
    linear = torch.nn.Linear(4, 3)
    return {
        "state dict": {"q.lora_A.weight": torch.randn(4, 16), "ids": torch.arange(5),
                       "bf16": torch.randn(2, 3).to(torch.bfloat16),
                       "half": torch.ones(3, dtype=torch.float16),
                       "mask": torch.tensor([True, False])},
        "V2 router": {"gate_state_dict": OrderedDict(weight=torch.randn(3, 32),
                                                     bias=torch.randn(3)),
                      "num_experts": 3, "input_size": 32, "top_k": 2, "temperature": 1.0,
                      "expert_maturity": [0.5, 1.0, None], "name": "router", "big": 2**70},
        "views": {"view": base[5:11].view(2, 3), "transposed": torch.randn(3, 4).t(),
                  "base": base, "empty": torch.zeros(0, 3), "scalar": torch.tensor(3.0)},
        "module state dict": {**linear.state_dict(), "param": torch.nn.Parameter(torch.ones(2))},
        "nested": {"a": {"b": {"c": torch.ones(1)}}, "list": [torch.zeros(2), 1, "x", (2.5, True)],
                   "none": None, 7: "int key"},
        "shared storage": {"w": (w := torch.randn(4, 4)), "row": w[1], "col": w[:, 2]},
    }


@pytest.fixture(scope="module")
def real_files(tmp_path_factory) -> dict[tuple[str, str], Path]:
    d = tmp_path_factory.mktemp("real")
    files = {}
    for name, obj in _objects().items():
        for fmt in FORMATS:
            files[name, fmt] = _save(d / f"{name.replace(' ', '_')}-{fmt}.pt", obj, fmt)
    return files


# --- real files --------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", list(_objects()))
def test_real_file_matches_torch_load(real_files, name, fmt):
    path = real_files[name, fmt]
    loaded = torch.load(path, weights_only=True)

    info = inspect_torch_file(path)

    assert isinstance(info, TorchFileInfo) and info.format == fmt
    assert _describe_inspected(info.obj) == _describe_loaded(loaded)
    assert sorted(size for _, size in info.storages.values()) == _storage_sizes(loaded)
    assert info.record_prefix == (path.stem if fmt == "zip" else "")
    for ref in flatten_tensors(info.obj).values():
        assert info.storages[ref.storage_key][1] >= ref.storage_bytes_needed


def test_flatten_tensors_names_a_v2_router_like_the_state_dict(real_files):
    info = inspect_torch_file(real_files["V2 router", "zip"])
    flat = flatten_tensors(info.obj)
    assert list(flat) == ["gate_state_dict.weight", "gate_state_dict.bias"]
    assert flat["gate_state_dict.weight"].shape == (3, 32)
    assert flat["gate_state_dict.weight"].dtype == "float32" and flat["gate_state_dict.weight"].numel == 96
    assert info.obj["num_experts"] == 3 and info.obj["temperature"] == 1.0

    nested = flatten_tensors(inspect_torch_file(real_files["nested", "legacy"]).obj)
    assert list(nested) == ["a.b.c", "list.0"]


def test_storage_dtypes_and_view_offsets(real_files):
    info = inspect_torch_file(real_files["views", "zip"])
    view = info.obj["view"]
    assert (view.shape, view.stride, view.storage_offset) == ((2, 3), (3, 1), 5)
    assert view.storage_key == info.obj["base"].storage_key
    assert info.storages[view.storage_key] == ("float32", 80)
    assert inspect_torch_file(real_files["state dict", "legacy"]).obj["bf16"].dtype == "bfloat16"


@pytest.mark.parametrize("protocol", [4, 5])
def test_newer_pickle_protocols_are_read(tmp_path, protocol):
    obj = _objects()["V2 router"]
    path = _save(tmp_path / "p.pt", obj, "zip", protocol)
    loaded = torch.load(path, weights_only=False)  # weights_only reads only protocol 2
    assert _describe_inspected(inspect_torch_file(path).obj) == _describe_loaded(loaded)


def test_dtypes_torch_stores_as_untyped_storage(tmp_path):
    obj = {"f8": torch.zeros(4).to(torch.float8_e4m3fn), "u16": torch.arange(3).to(torch.uint16)}
    info = inspect_torch_file(_save(tmp_path / "n.pt", obj))
    assert info.obj["f8"].dtype == "float8_e4m3fn" and info.obj["u16"].dtype == "uint16"
    assert sorted(info.storages.values()) == [("uint8", 4), ("uint8", 6)]


def test_plain_values_torch_allows_become_symbols(tmp_path):
    obj = {"device": torch.device("cuda", 0), "dtype": torch.float16, "set": {1, 2},
           "complex": 1 + 2j, "bytes": b"\x00\xff", "bytearray": bytearray(b"z"),
           "size": torch.Size([2, 3])}
    path = _save(tmp_path / "v.pt", obj)
    torch.load(path, weights_only=True)  # torch accepts all of them

    got = inspect_torch_file(path).obj

    assert got == {"device": TorchSymbol("torch.device", ("cuda", 0)),
                   "dtype": TorchSymbol("torch.float16"), "set": {1, 2}, "complex": 1 + 2j,
                   "bytes": b"\x00\xff", "bytearray": b"z", "size": (2, 3)}


@pytest.mark.parametrize("value", [frozenset({1}), slice(1, 2), range(3), Path("/etc"),
                                   datetime.date(2020, 1, 1), torch.nn.Linear(2, 2)],
                         ids=lambda v: type(v).__name__)
def test_what_weights_only_refuses_is_refused(tmp_path, value):
    path = _save(tmp_path / "x.pt", {"value": value})
    with pytest.raises(Exception):
        torch.load(path, weights_only=True)
    assert _code(path) == UNSAFE_PICKLE


def test_allowlist_is_exactly_torchs_default():
    from torch._weights_only_unpickler import _get_allowed_globals

    assert ALLOWED_GLOBALS == set(_get_allowed_globals())


def test_allowlisted_but_unmodelled_tensors_are_refused(tmp_path):
    path = _save(tmp_path / "sparse.pt", {"s": torch.eye(3).to_sparse()})
    torch.load(path, weights_only=True)
    with pytest.raises(FormatError, match="does not model") as err:
        inspect_torch_file(path)
    assert err.value.code == UNSAFE_PICKLE


@pytest.fixture(scope="module")
def training_args_bin(tmp_path_factory) -> Path:
    from transformers import TrainingArguments

    d = tmp_path_factory.mktemp("trainer")
    args = TrainingArguments(output_dir=str(d / "out"), report_to=[], use_cpu=True)
    path = d / "training_args.bin"
    torch.save(args, path)  # what Trainer._save does
    return path


def test_training_args_bin_is_checked_as_a_container_only(training_args_bin):
    info = inspect_torch_file(training_args_bin, check_pickle=False)
    assert info.format == "zip" and info.obj is None and info.storages == {}
    assert _code(training_args_bin) == UNSAFE_PICKLE


# --- hostile pickles: refused, and nothing runs ------------------------------------

class _Payload:
    """Pickles as ``func(*args)``: what a malicious checkpoint would run on load."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.eval": _Payload(builtins.eval, (f"open({str(marker)!r}, 'w').close()",)),
        "subprocess.Popen": _Payload(subprocess.Popen, (["touch", str(marker)],)),
        "arbitrary class": _Payload(logging.FileHandler, (str(marker),)),
    }


GLOBAL_NAMES = {"os.system": "posix.system", "builtins.eval": "builtins.eval",
                "subprocess.Popen": "subprocess.Popen", "arbitrary class": "logging.FileHandler"}


def _zip_archive(path: Path, data_pkl: bytes, records: dict[str, bytes] | None = None,
                 prefix: str = "archive") -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", data_pkl)
        for name, data in (records or {"version": b"3\n"}).items():
            z.writestr(f"{prefix}/{name}", data)
    return path


def _children() -> set[tuple[int, int]]:
    """(pid, start time) of every child process of this one, zombies included (from /proc)."""
    me, out = os.getpid(), set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue            # gone meanwhile
        if int(fields[1]) == me:        # after the command: state, ppid, ... starttime at [19]
            out.add((int(entry), int(fields[19])))
    return out


@pytest.mark.parametrize("container", ["zip", "legacy", "zip, protocol 5", "plain pickle"])
@pytest.mark.parametrize("payload", ["os.system", "builtins.eval", "subprocess.Popen",
                                     "arbitrary class"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path, container, payload):
    marker = tmp_path / "pwned"
    obj = {"w": torch.ones(2), "x": _payloads(marker)[payload]}
    path = tmp_path / "evil.pt"
    if container in ("zip", "legacy"):
        _save(path, obj, container)
    elif container == "zip, protocol 5":
        _zip_archive(path, pickle.dumps(obj["x"], protocol=5))
    else:
        path.write_bytes(pickle.dumps(obj["x"], protocol=2))

    children = _children()
    with pytest.raises(FormatError) as err:
        inspect_torch_file(path)
    lenient = None if container == "plain pickle" else inspect_torch_file(path, check_pickle=False)

    assert err.value.code == UNSAFE_PICKLE
    assert "needs global" in err.value.message
    assert GLOBAL_NAMES[payload] in err.value.message
    assert lenient is None or lenient.obj is None
    # Nothing ran, and nothing was left running to run later: os.system, eval and the file
    # handler act before returning, and a Popen'd process stays this process's child (running,
    # or a zombie until reaped; reaped only once it has exited, i.e. after the marker exists).
    assert _children() == children, "a process was started while the file was inspected"
    assert not marker.exists()

    # The payload is live: unpickling it for real does create the marker.
    if container in ("zip", "legacy"):
        with pytest.raises(Exception):
            torch.load(path, weights_only=True)
        loaded = torch.load(path, weights_only=False)["x"]
    else:
        data = zipfile.ZipFile(path).read("archive/data.pkl") if container.startswith("zip") \
            else path.read_bytes()
        loaded = pickle.loads(data)
    if hasattr(loaded, "wait"):
        loaded.wait()       # the Popen payload: its process has exited, the marker is there
    if hasattr(loaded, "close"):
        loaded.close()
    assert marker.exists()


@pytest.mark.parametrize("module, name", [("torch._utils", "_c__builtin__\nset\n"),
                                          ("os\r\nerror: x: forged line", "system"),
                                          ("os", "sys\x1b[2Jtem\u2028")])
def test_refused_global_with_control_characters_is_named_on_one_line(tmp_path, module, name):
    # STACK_GLOBAL takes the names from strings, which may hold any character.
    def short_unicode(text: str) -> bytes:
        raw = text.encode()
        return b"\x8c" + bytes([len(raw)]) + raw

    data = b"\x80\x04" + short_unicode(module) + short_unicode(name) + b"\x93."
    path = _zip_archive(tmp_path / "evil.pt", data)

    with pytest.raises(FormatError) as err:
        inspect_torch_file(path)

    assert err.value.code == UNSAFE_PICKLE
    assert len(err.value.message.splitlines()) == 1 and err.value.message.isprintable()
    assert repr(f"{module}.{name}") in err.value.message


@pytest.mark.parametrize("data, what", [
    (b"\x80\x02\x82\x01.", "extension code"),
    (b"(S'touch x'\nios\nsystem\n.", "os.system"),
    (b"(cos\nsystem\nS'touch x'\no.", "os.system"),
    (b"\x80\x04\x8c\x02os\x8c\x06system\x93.", "os.system"),
    (b"\x80\x02cbuiltins\ngetattr\n.", "builtins.getattr"),
    (b"\x80\x02ctorch._utils\n_rebuild_qtensor\n)R.", "does not model"),
], ids=["EXT1", "INST", "OBJ", "STACK_GLOBAL", "getattr", "allowlisted, unmodelled"])
def test_hostile_opcodes_are_unsafe(tmp_path, data, what):
    path = _zip_archive(tmp_path / "h.pt", data)
    with pytest.raises(FormatError, match=what) as err:
        inspect_torch_file(path)
    assert err.value.code == UNSAFE_PICKLE


_DEEP = b"\x80\x02" + b"]" * 5000 + b"a" * 4999 + b"."
_LAUGHS = b"\x80\x02]q\x00" + b"".join(
    b"(h%ch%clq%c" % (i, i, i + 1) for i in range(60)) + b"."
_HASH_BOMB = b"\x80\x02})q\x000" + b"h\x00h\x00\x86q\x000" * 80 + b"h\x00Ns."


@pytest.mark.parametrize("data, what", [
    (_DEEP, "deeper than"),
    (b"\x80\x02]q\x00h\x00a.", "contains itself"),
    (_HASH_BOMB, "dict key"),
    (b"\x80\x02\x8b\x00\x00\x00\x01.", "integer of"),
    (b"\x80\x02Pstorage\n.", "persistent id"),
    (b"\x80\x02\xff.", "unknown pickle opcode"),
    (b"\x80\x02h\x05.", "never stored"),
    (b"\x80\x02K\x01K\x02K\x03s.", "SETITEM on a int"),
    (b"\x80\x02a.", "stack underflow"),
    (b"\x80\x02" + b"(" * 2000 + b".", "nested MARKs"),
    (b"\x80\x02X\x10\x00\x00\x00abc", "ends before"),
    (b"\x80\x02ctorch\nfloat32\n)R.", "does not model"),
], ids=["deep nesting", "self reference", "tuple-key hash bomb", "huge LONG4", "text PERSID",
        "unknown opcode", "bad memo", "SETITEM on int", "underflow", "MARK bomb", "short",
        "calling a dtype"])
def test_malformed_pickles(tmp_path, data, what):
    path = _zip_archive(tmp_path / "m.pt", data)
    with pytest.raises(FormatError, match=what):
        inspect_torch_file(path)


def test_shared_subtree_bomb_is_bounded(tmp_path):
    # 61 lists, each holding the one before twice: 2**60 paths for whoever walks them.
    path = _zip_archive(tmp_path / "laughs.pt", _LAUGHS)
    with pytest.raises(FormatError, match="unfolds to more than") as err:
        inspect_torch_file(path)
    assert err.value.code == BAD_ARCHIVE

    tree: dict = {"w": TensorRef("float32", (1,), (1,), "0", 0)}
    for _ in range(60):
        tree = {"a": tree, "b": tree}
    with pytest.raises(FormatError) as err:
        flatten_tensors(tree, max_nodes=100_000)
    assert err.value.code == BAD_ARCHIVE


def test_shared_leaves_are_fine(tmp_path):
    # Tied weights: one tensor object under two names, pickled once and memoized.
    w = torch.randn(4, 2)
    info = inspect_torch_file(_save(tmp_path / "tied.pt", {"embed.weight": w, "lm_head.weight": w}))
    flat = flatten_tensors(info.obj)
    assert flat["embed.weight"] is flat["lm_head.weight"] and len(info.storages) == 1


def test_value_count_is_capped(tmp_path, monkeypatch):
    monkeypatch.setattr(torchsave.pickle_vm, "_MAX_PUSHES", 1000)
    path = _zip_archive(tmp_path / "many.pt", b"\x80\x02]" + b"Na" * 1500 + b".")
    with pytest.raises(FormatError, match="more than 1000 values"):
        inspect_torch_file(path)


# --- damaged containers ------------------------------------------------------------

def _records(path: Path) -> tuple[str, dict[str, bytes]]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        prefix = names[0].split("/")[0]
        return prefix, {n[len(prefix) + 1:]: z.read(n) for n in names}


def _rezip(src: Path, dst: Path, edit=None, compress: set[str] = frozenset()) -> Path:
    prefix, records = _records(src)
    if edit:
        edit(records)
    with zipfile.ZipFile(dst, "w") as z:
        for name, data in records.items():
            z.writestr(f"{prefix}/{name}", data,
                       zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED)
    return dst


def test_truncated_zip_says_truncated(real_files, tmp_path):
    # torch writes sizes after each record's data, so only a cut in the central directory
    # is certain; any other cut is a bad archive that says it was probably truncated.
    blob = real_files["state dict", "zip"].read_bytes()
    for cut in (len(blob) // 2, 200, blob.find(b"PK\x01\x02"), len(blob) - 30, len(blob) - 5):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(blob[:cut])
        with pytest.raises(FormatError, match="truncated") as err:
            inspect_torch_file(path)
        assert err.value.code in (TRUNCATED, BAD_ARCHIVE)


def test_truncated_plain_zip_is_truncated(real_files, tmp_path):
    # An archive rewritten by zipfile keeps sizes in its local headers: a cut is certain.
    blob = _rezip(real_files["state dict", "zip"], tmp_path / "plain.pt").read_bytes()
    for cut in (len(blob) // 2, 100, blob.find(b"PK\x01\x02") + 30, len(blob) - 5):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(blob[:cut])
        assert _code(path) == TRUNCATED, cut


def test_zip_damage_is_bad_archive(real_files, tmp_path):
    src = real_files["state dict", "zip"]
    blob = src.read_bytes()
    cases = {
        "missing storage": _rezip(src, tmp_path / "a.pt", lambda r: r.pop("data/1")),
        "short storage": _rezip(src, tmp_path / "b.pt", lambda r: r.update({"data/0": b"x" * 10})),
        "compressed storage": _rezip(src, tmp_path / "c.pt", compress={"data/0"}),
        "no data.pkl": _rezip(src, tmp_path / "d.pt", lambda r: r.pop("data.pkl")),
        "tensor past its storage": _rezip(src, tmp_path / "e.pt", lambda r: r.update(
            {"data.pkl": r["data.pkl"].replace(b"K\x40t", b"K\x02t", 1)})),
    }
    two_folders = tmp_path / "f.pt"
    _zip_archive(two_folders, _records(src)[1]["data.pkl"], {"version": b"3"}, prefix="a")
    with zipfile.ZipFile(two_folders, "a") as z:
        z.writestr("b/version", b"3")
    cases["two top-level folders"] = two_folders
    dup = tmp_path / "g.pt"
    dup.write_bytes(blob)
    with pytest.warns(UserWarning), zipfile.ZipFile(dup, "a") as z:
        z.writestr(z.namelist()[0], b"\x80\x02}.")
    cases["duplicate record"] = dup
    trailing = tmp_path / "h.pt"
    trailing.write_bytes(blob + b"junk")
    cases["bytes after the end record"] = trailing

    for name, path in cases.items():
        assert _code(path) == BAD_ARCHIVE, name
    assert b"K\x40t" in _records(src)[1]["data.pkl"]  # the edit above did edit


def _set_declared_size(blob: bytearray, path: Path, record: str, size: int) -> None:
    """Patch a record's uncompressed size in its local and central headers."""
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(record))
    struct.pack_into("<I", blob, info.header_offset + 22, size)
    at = 0
    while (at := blob.find(b"PK\x01\x02", at + 1)) >= 0:
        (name_len,) = struct.unpack_from("<H", blob, at + 28)
        if blob[at + 46:at + 46 + name_len] == info.filename.encode():
            struct.pack_into("<I", blob, at + 24, size)


def test_zip_bomb_is_refused_without_inflating(real_files, tmp_path, monkeypatch):
    path = _rezip(real_files["state dict", "zip"], tmp_path / "bomb.pt", compress={"data/0"})
    blob = bytearray(path.read_bytes())
    _set_declared_size(blob, path, "data/0", 0xFFFFFFF0)
    path.write_bytes(blob)
    monkeypatch.setattr(zlib, "decompressobj", None)  # inflating anything would fail loudly

    with pytest.raises(FormatError, match="zip bomb") as err:
        inspect_torch_file(path)

    assert err.value.code == BAD_ARCHIVE


def test_overlapping_records_are_bad_archive(real_files, tmp_path):
    blob = bytearray(real_files["state dict", "zip"].read_bytes())
    first = blob.find(b"PK\x01\x02")
    second = blob.find(b"PK\x01\x02", first + 4)
    struct.pack_into("<I", blob, second + 42, struct.unpack_from("<I", blob, first + 42)[0])
    path = tmp_path / "overlap.pt"
    path.write_bytes(blob)
    assert _code(path) == BAD_ARCHIVE


def _legacy_layout(path: Path) -> tuple[bytes, int]:
    """The file's bytes and where its storage blocks start."""
    blob = path.read_bytes()
    stream = io.BytesIO(blob)
    for _ in range(5):
        for _ in pickletools.genops(stream):
            pass
    return blob, stream.tell()


def test_truncated_legacy_file_is_truncated(real_files, tmp_path):
    blob, storages_at = _legacy_layout(real_files["state dict", "legacy"])
    for cut in (5, 40, storages_at - 3, storages_at + 4, len(blob) - 1):
        path = tmp_path / f"cut{cut}.pt"
        path.write_bytes(blob[:cut])
        assert _code(path) == TRUNCATED, cut


def test_legacy_storage_count_mismatch_is_bad_archive(real_files, tmp_path):
    blob, storages_at = _legacy_layout(real_files["state dict", "legacy"])
    blob = bytearray(blob)
    struct.pack_into("<q", blob, storages_at, struct.unpack_from("<q", blob, storages_at)[0] + 1)
    path = tmp_path / "count.pt"
    path.write_bytes(blob)
    assert _code(path) == BAD_ARCHIVE


def test_not_a_torch_file(tmp_path):
    cases = {"random.bin": os.urandom(4096), "text.bin": b"hello world\n",
             "safetensors.bin": b"\x08\0\0\0\0\0\0\0{}      ",
             "pickled int.bin": pickle.dumps(12345, protocol=2)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        info = tarfile.TarInfo("sys_info")
        tar.addfile(info, io.BytesIO(b""))
    cases["old tar format.bin"] = buf.getvalue()
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        assert _code(tmp_path / name) == BAD_ARCHIVE, name
    (tmp_path / "empty.pt").write_bytes(b"")
    assert _code(tmp_path / "empty.pt") == TRUNCATED
    with pytest.raises(FileNotFoundError):
        inspect_torch_file(tmp_path / "missing.pt")


def _bytes_read() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("no rchar")


@pytest.mark.parametrize("fmt", FORMATS)
def test_reads_no_tensor_data(tmp_path, fmt):
    path = _save(tmp_path / "big.pt", {"w": torch.zeros(1024, 1024)}, fmt)  # 4 MiB
    before = _bytes_read()
    info = inspect_torch_file(path)
    assert _bytes_read() - before < 100_000
    assert info.storages == {next(iter(info.storages)): ("float32", 4 * 1024 * 1024)}


# --- properties --------------------------------------------------------------------

def _vm(data: bytes, strict: bool = True):
    try:
        return torchsave._run_pickle(data, 0, strict=strict, pid_len=5)[1]
    except FormatError as exc:
        assert exc.code in (BAD_ARCHIVE, UNSAFE_PICKLE) and "\n" not in exc.message
    except torchsave._Short:
        pass
    return None


@pytest.mark.fuzz
@settings(max_examples=2500, deadline=None)
@given(st.binary(max_size=120), st.booleans())
def test_vm_on_arbitrary_bytes_gives_a_value_or_a_format_error(data, strict):
    _vm(data, strict)
    _vm(b"\x80\x02" + data, strict)


_TENSOR = (b"ctorch._utils\n_rebuild_tensor_v2\n((X\x07\x00\x00\x00storagectorch\nFloatStorage\n"
           b"X\x01\x00\x00\x000X\x03\x00\x00\x00cpuK\x0ctQK\x00K\x03K\x04\x86K\x04K\x01\x86\x89"
           b"ccollections\nOrderedDict\n)RtR")
_FRAGMENTS = [
    b"(", b")", b"]", b"}", b"N", b"\x88", b"\x89", b"K\x01", b"K\x00", b"J\xff\xff\xff\xff",
    b"M\x00\x01", b"\x8a\x01\x05", b"\x8a\x00", b"G?\xf0\x00\x00\x00\x00\x00\x00", b"F1.5\n",
    b"I01\n", b"L12L\n", b"X\x01\x00\x00\x00a", b"\x8c\x01b", b"C\x01z", b"S'q'\n", b"Vu\n",
    b"t", b"\x85", b"\x86", b"\x87", b"l", b"d", b"a", b"e", b"s", b"u", b"R", b"b", b"\x81",
    b"\x92", b"Q", b"0", b"1", b"2", b"q\x00", b"q\x01", b"h\x00", b"h\x01", b"\x94", b"p0\n",
    b"g0\n", b"\x8f", b"\x90", b"\x91", b"\x93", b"\x95\x02\x00\x00\x00\x00\x00\x00\x00",
    b"cos\nsystem\n", b"ccollections\nOrderedDict\n", b"ctorch\nSize\n", b"c__builtin__\nset\n",
    b"ctorch\nFloatStorage\n", b"ctorch._utils\n_rebuild_tensor_v2\n", b"ctorch\ndevice\n",
    b"c_codecs\nencode\n", b"X\x07\x00\x00\x00storage", b"X\x01\x00\x00\x000",
    b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00latin1", b"\x8c\x02os\x8c\x06system",
    b"\x8c\x0bcollections\x8c\x0bOrderedDict", _TENSOR, b".",
]


@pytest.mark.fuzz
@settings(max_examples=2500, deadline=None)
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=40), st.booleans())
def test_vm_on_opcode_soup_gives_a_value_or_a_format_error(fragments, strict):
    data = b"\x80\x02" + b"".join(fragments) + b"."
    value = _vm(data, strict)
    if value is not None and strict:
        # Whatever was accepted named only allowlisted globals.
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                module, name = arg.split(" ")
                assert f"{module}.{name}".replace("__builtin__", "builtins") in ALLOWED_GLOBALS
            if op.name == "STOP":
                break


_WORK = tempfile.TemporaryDirectory(prefix="torchsave-fuzz-")


def _inspect_bytes(blob: bytes, name: str) -> None:
    path = Path(_WORK.name) / name
    path.write_bytes(blob)
    for check in (True, False):
        try:
            info = inspect_torch_file(path, check_pickle=check)
        except FormatError as exc:
            assert exc.code in (BAD_ARCHIVE, TRUNCATED, UNSAFE_PICKLE) and "\n" not in exc.message
        else:
            assert info.format in ("zip", "legacy")
            if check:
                flatten_tensors(info.obj)


def _mutations(blob: bytes):
    return byte_mutations(blob, rounds=3, kinds=KINDS + ("zero",), longest_delete=8)


def _small_real(fmt: str) -> bytes:
    buf = io.BytesIO()
    obj = {"gate_state_dict": {"weight": torch.ones(2, 3), "bias": torch.zeros(2)},
           "num_experts": 2, "temperature": 1.0}
    torch.save(obj, buf, _use_new_zipfile_serialization=(fmt == "zip"))
    return buf.getvalue()


_REAL_ZIP, _REAL_LEGACY = _small_real("zip"), _small_real("legacy")


@pytest.mark.fuzz
@settings(max_examples=400, deadline=None)
@given(st.one_of(_mutations(_REAL_ZIP), _mutations(_REAL_LEGACY), st.binary(max_size=300)))
def test_mutated_and_arbitrary_files_give_a_result_or_a_format_error(blob):
    _inspect_bytes(blob, "fuzz.pt")


# --- the zip reader: structures parsed from the bytes at hand ----------------------

def _cd_records(blob: bytes) -> list[int]:
    """Offsets of the central directory records (the directory follows the data)."""
    out, at = [], len(blob)
    start = blob.rfind(b"PK\x05\x06")
    (cd_offset,) = struct.unpack_from("<I", blob, start + 16)
    at = cd_offset
    while blob.startswith(b"PK\x01\x02", at):
        out.append(at)
        at += 46 + sum(struct.unpack_from("<HHH", blob, at + 28))
    return out


def _plain_zip(tmp_path: Path, **kwargs) -> bytes:
    """A small zipfile-written archive of a real state dict (no zip64 records)."""
    src = _save(tmp_path / "src.pt", {"w": torch.ones(2, 3), "b": torch.zeros(2)})
    return _rezip(src, tmp_path / "plain.pt", **kwargs).read_bytes()


def _inspect_blob(tmp_path: Path, blob: bytes, name: str = "x.pt", **kwargs):
    path = tmp_path / name
    path.write_bytes(blob)
    return inspect_torch_file(path, **kwargs)


def _blob_code(tmp_path: Path, blob: bytes) -> tuple[str, str]:
    path = tmp_path / "x.pt"
    path.write_bytes(blob)
    with pytest.raises(FormatError) as err:
        inspect_torch_file(path)
    return err.value.code, err.value.message


def test_archive_comment_is_read_past(tmp_path):
    blob = _plain_zip(tmp_path)
    for comment in (b"note", b"x" * 40_000):
        buf = io.BytesIO(blob)
        with zipfile.ZipFile(buf, "a") as z:
            z.comment = comment
        info = _inspect_blob(tmp_path, buf.getvalue())
        assert set(info.storages.values()) == {("float32", 24), ("float32", 8)}


def test_comment_hiding_another_end_record_is_refused(tmp_path):
    blob = _plain_zip(tmp_path)
    end = blob.rfind(b"PK\x05\x06")
    fake = blob[end:end + 22] + b"zz"  # an end record whose own comment would not fit
    forged = bytearray(blob[:end + 22] + fake)
    struct.pack_into("<H", forged, end + 20, len(fake))  # the real record's comment
    assert _zipfile_directory(bytes(forged)) is None  # zipfile takes the fake one
    code, message = _blob_code(tmp_path, bytes(forged))
    assert code == BAD_ARCHIVE and "comment" in message


def test_directory_record_running_past_the_directory_is_refused(tmp_path):
    blob = bytearray(_plain_zip(tmp_path))
    last = _cd_records(blob)[-1]
    struct.pack_into("<H", blob, last + 32, 500)  # a comment longer than what is left
    assert zipfile.ZipFile(io.BytesIO(blob)).testzip() is None  # zipfile cuts it silently
    code, message = _blob_code(tmp_path, bytes(blob))
    assert code == BAD_ARCHIVE and "runs past" in message


@pytest.mark.parametrize("damage, what", [
    ("signature", "bad magic number"),
    ("version", "version 6.4"),
    ("utf-8 name", "unreadable zip archive"),
    ("extra field", "corrupt extra field"),
    ("zip64 extra", "zip64 extra field"),
    ("short directory", "truncated central directory"),
    ("encrypted", "encrypted"),
    ("method", "compression method 12"),
    ("local name", "local header names"),
    ("local header", "no local header"),
])
def test_directory_damage_is_bad_archive(tmp_path, damage, what):
    blob = bytearray(_plain_zip(tmp_path))
    first = _cd_records(blob)[0]
    if damage == "signature":
        blob[first + 3] ^= 0xFF
    elif damage == "version":
        blob[first + 6] = 64  # zipfile raised NotImplementedError, not BadZipFile, here
    elif damage == "utf-8 name":
        struct.pack_into("<H", blob, first + 8, 0x800)
        blob[first + 46] = 0xFF
    elif damage in ("extra field", "zip64 extra"):
        name_len = struct.unpack_from("<H", blob, first + 28)[0]
        at = first + 46 + name_len
        extra = (struct.pack("<HH", 0x0001, 4) + b"\0" * 4 if damage == "zip64 extra"
                 else struct.pack("<HH", 0x1234, 9) + b"\0" * 4)
        blob[at:at] = extra
        struct.pack_into("<H", blob, first + 30, len(extra))
        if damage == "zip64 extra":
            struct.pack_into("<I", blob, first + 24, 0xFFFFFFFF)  # size in the extra field
        end = blob.rfind(b"PK\x05\x06")
        struct.pack_into("<I", blob, end + 12, struct.unpack_from("<I", blob, end + 12)[0]
                         + len(extra))
    elif damage == "short directory":
        end = blob.rfind(b"PK\x05\x06")
        blob[end:end] = b"\0" * 10
        struct.pack_into("<I", blob, end + 10 + 12,
                         struct.unpack_from("<I", blob, end + 10 + 12)[0] + 10)
    elif damage == "encrypted":
        struct.pack_into("<H", blob, first + 8, 0x01)
    elif damage == "method":
        struct.pack_into("<H", blob, first + 10, 12)
    elif damage == "local name":
        (offset,) = struct.unpack_from("<I", blob, first + 42)
        blob[offset + 31] ^= 0x20
    else:
        (offset,) = struct.unpack_from("<I", blob, _cd_records(blob)[1] + 42)
        blob[offset] = 0
    code, message = _blob_code(tmp_path, bytes(blob))
    assert code == BAD_ARCHIVE and what in message, message


def test_zip64_end_record_must_precede_its_locator(tmp_path, real_files):
    blob = real_files["state dict", "zip"].read_bytes()
    end = blob.rfind(b"PK\x05\x06")
    locator = end - 20
    assert blob[locator:locator + 4] == b"PK\x06\x07"
    moved = blob[:locator] + b"\0" * 8 + blob[locator:]  # junk between the two records
    code, message = _blob_code(tmp_path, moved)
    assert code == BAD_ARCHIVE and "zip64" in message


def test_data_pkl_crc_is_checked(tmp_path, real_files):
    blob = bytearray(real_files["V2 router", "zip"].read_bytes())
    first = _cd_records(blob)[0]  # torch writes data.pkl first
    name_len = struct.unpack_from("<H", blob, first + 28)[0]
    assert blob[first + 46:first + 46 + name_len].endswith(b"/data.pkl")
    blob[first + 16] ^= 1
    code, message = _blob_code(tmp_path, bytes(blob))
    assert code == BAD_ARCHIVE and "CRC" in message


def test_deflated_data_pkl_is_inflated_in_bounds(tmp_path, real_files, monkeypatch):
    src = real_files["V2 router", "zip"]
    stored = inspect_torch_file(src)
    path = _rezip(src, tmp_path / "deflated.pt", compress={"data.pkl"})
    monkeypatch.setattr(torchsave.zip_archive, "_INFLATE_CHUNK", 7)  # many chunks
    deflated = inspect_torch_file(path)
    assert (deflated.obj, deflated.storages) == (stored.obj, stored.storages)

    # A record that declares fewer bytes than its stream holds gives those bytes only.
    asked = []
    real = zlib.decompressobj

    class Spy:
        def __init__(self, *args):
            self.inner = real(*args)

        def decompress(self, data, max_length=0):
            asked.append(max_length)
            return self.inner.decompress(data, max_length)

        def __getattr__(self, name):
            return getattr(self.inner, name)

    blob = bytearray(path.read_bytes())
    _set_declared_size(blob, path, "data.pkl", 10)
    monkeypatch.setattr(zlib, "decompressobj", Spy)
    code, message = _blob_code(tmp_path, bytes(blob))
    assert code == BAD_ARCHIVE and "CRC" in message
    assert asked and sum(asked) <= 10 * len(asked) and max(asked) <= 10


def _zipfile_directory(blob: bytes):
    """zipfile's reading of a central directory, or None where it refuses the archive."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            return [(i.filename, i.header_offset, i.compress_type, i.flag_bits, i.CRC,
                     i.compress_size, i.file_size) for i in z.infolist()]
    except (zipfile.BadZipFile, ValueError, struct.error, EOFError, NotImplementedError):
        return None


def _our_directory(blob: bytes):
    f = torchsave._File(-1, len(blob), blob)
    try:
        found = torchsave._find_central_directory(f)
        if found is None or found[0] + found[1] != found[2]:
            return None
        entries = torchsave._central_directory(f.get(found[0], found[1]))
    except FormatError as exc:
        assert exc.code == BAD_ARCHIVE and "\n" not in exc.message
        return None
    return [(name, offset, method, flags, crc, csize, usize)
            for offset, name, _, flags, method, crc, csize, usize in entries]


_PLAIN_ZIP = _small_real("zip")
_DEFLATED_ZIP = io.BytesIO()
with zipfile.ZipFile(io.BytesIO(_PLAIN_ZIP)) as _src, \
        zipfile.ZipFile(_DEFLATED_ZIP, "w") as _dst:
    for _name in _src.namelist():
        _dst.writestr(_name, _src.read(_name), zipfile.ZIP_DEFLATED
                      if _name.endswith("data.pkl") else zipfile.ZIP_STORED)
    _dst.comment = b"a comment"
_DEFLATED_ZIP = _DEFLATED_ZIP.getvalue()


@pytest.mark.fuzz
@settings(max_examples=600, deadline=None)
@given(st.one_of(_mutations(_REAL_ZIP), _mutations(_DEFLATED_ZIP)))
def test_directory_parse_agrees_with_zipfile(blob):
    ours, theirs = _our_directory(blob), _zipfile_directory(blob)
    if theirs is None:
        assert ours is None  # nothing zipfile refuses is read
    elif ours is not None:
        assert ours == theirs


@pytest.mark.fuzz
@settings(max_examples=400, deadline=None)
@given(st.one_of(_mutations(_REAL_ZIP), _mutations(_DEFLATED_ZIP)))
def test_data_pkl_is_read_as_zipfile_reads_it(blob):
    read = []
    real = torchsave.zip_archive._read_record

    def spy(f, entry):
        read.append((entry[1], real(f, entry)))
        return read[-1][1]

    path = Path(_WORK.name) / "pkl.pt"
    path.write_bytes(blob)
    with mock.patch.object(torchsave.zip_archive, "_read_record", spy):
        try:
            inspect_torch_file(path, check_pickle=False)
        except FormatError:
            pass
    for name, data in read:  # what was read, zipfile reads too, and the same
        with zipfile.ZipFile(io.BytesIO(blob)) as z:
            assert z.read(name) == data


def _outcome(path: Path, check_pickle: bool):
    try:
        info = inspect_torch_file(path, check_pickle=check_pickle)
    except FormatError as exc:
        return exc.code, exc.message
    return info.format, repr(info.obj), info.storages, info.record_prefix


_SMALL_WINDOWS = dict(_SMALL_FILE=0, _HEAD_READ=64)   # read by torchsave itself
_SMALL_ZIP_WINDOWS = dict(_TAIL_READ=64, _READ_AHEAD=64, _INFLATE_CHUNK=16)  # by its zip reader


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(st.one_of(_mutations(_REAL_ZIP), _mutations(_DEFLATED_ZIP), _mutations(_REAL_LEGACY)))
def test_windowed_reads_give_what_one_read_gives(blob):
    path = Path(_WORK.name) / "windows.pt"
    path.write_bytes(blob)
    for check in (True, False):
        whole = _outcome(path, check)
        with mock.patch.multiple(torchsave, **_SMALL_WINDOWS), \
                mock.patch.multiple(torchsave.zip_archive, **_SMALL_ZIP_WINDOWS):
            assert _outcome(path, check) == whole


def test_large_file_reads_only_what_it_needs(tmp_path):
    # > 1 MiB; a directory of ~30 KiB (beyond the first tail read); a data.pkl of
    # ~40 KiB (beyond the first head read); a comment that makes the end record hard to find.
    obj = {f"layer.{i}.{'x' * 40}": torch.zeros(1) for i in range(300)}
    obj["big"] = torch.zeros(300_000)
    path = _save(tmp_path / "large.pt", obj)
    with zipfile.ZipFile(path, "a") as z:
        z.comment = b"c" * 30_000
    blob = path.read_bytes()
    assert len(blob) > 1 << 20
    with mock.patch.object(torchsave, "_SMALL_FILE", 1 << 30):
        whole = inspect_torch_file(path)
    before = _bytes_read()
    windowed = inspect_torch_file(path)
    assert _bytes_read() - before < 400_000
    assert windowed == whole and len(windowed.storages) == 301
    assert flatten_tensors(windowed.obj)["big"].shape == (300_000,)


# --- the data.pkl memo --------------------------------------------------------------

def test_memo_hit_equals_miss(real_files):
    for (name, fmt), path in real_files.items():
        cache = ReadCache()
        miss = inspect_torch_file(path, cache=cache)
        hit = inspect_torch_file(path, cache=cache)
        assert hit == miss == inspect_torch_file(path), name
        assert _describe_inspected(hit.obj) == _describe_loaded(torch.load(path, weights_only=True))
        assert len(cache.pickles) == 1


def test_memo_hands_every_caller_its_own_tree(tmp_path):
    shared = [1, 2]
    path = _save(tmp_path / "s.pt", {"a": shared, "b": shared, "t": (shared, 3), "s": {4},
                                     "w": torch.ones(2), "d": {"x": [torch.zeros(1)]}})
    cache = ReadCache()
    first = inspect_torch_file(path, cache=cache)
    first.obj["a"].append(99)
    first.obj["s"].add(5)
    first.obj["d"]["x"].clear()
    first.obj["new"] = 1
    second = inspect_torch_file(path, cache=cache)
    assert second.obj["a"] == [1, 2] and second.obj["s"] == {4} and "new" not in second.obj
    assert len(second.obj["d"]["x"]) == 1
    # Sharing within one tree is kept; immutable leaves are shared between trees.
    assert second.obj["a"] is second.obj["b"] is second.obj["t"][0]
    assert second.obj["a"] is not first.obj["a"]
    assert second.obj["w"] is first.obj["w"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_memo_serves_files_that_differ_only_in_tensor_values(tmp_path, fmt):
    # As in training: the same parameters, updated in place, saved at each checkpoint (the
    # legacy format names storages by address, so only the same storages give one pickle).
    cache = ReadCache()
    weight, bias = torch.randn(4, 8), torch.randn(4)
    infos = []
    for i in range(5):
        weight.add_(1.0)
        bias.mul_(2.0)
        path = tmp_path / f"ckpt-{i}" / "router.pt"
        path.parent.mkdir()
        _save(path, {"gate.weight": weight, "gate.bias": bias}, fmt)
        infos.append(inspect_torch_file(path, cache=cache))
    assert len(cache.pickles) == 1
    assert all(info == infos[0] for info in infos)


def test_legacy_memo_checks_each_file_past_its_pickles(real_files, tmp_path):
    blob, storages_at = _legacy_layout(real_files["state dict", "legacy"])
    cache = ReadCache()
    inspect_torch_file(real_files["state dict", "legacy"], cache=cache)
    miscounted = bytearray(blob)
    struct.pack_into("<q", miscounted, storages_at,
                     struct.unpack_from("<q", miscounted, storages_at)[0] + 1)
    (tmp_path / "count.pt").write_bytes(miscounted)
    (tmp_path / "cut.pt").write_bytes(blob[:-1])
    assert _code(tmp_path / "count.pt", cache=cache) == BAD_ARCHIVE
    assert _code(tmp_path / "cut.pt", cache=cache) == TRUNCATED
    assert len(cache.pickles) == 1  # both were memo hits


def test_container_checks_run_on_a_memo_hit(tmp_path, real_files):
    src = real_files["state dict", "zip"]
    cache = ReadCache()
    inspect_torch_file(src, cache=cache)  # its data.pkl is now memoised
    damaged = {
        "missing": _rezip(src, tmp_path / "a.pt", lambda r: r.pop("data/1")),
        "holds": _rezip(src, tmp_path / "b.pt", lambda r: r.update({"data/0": b"x" * 10})),
        "compressed": _rezip(src, tmp_path / "c.pt", compress={"data/0"}),
    }
    crc = bytearray(src.read_bytes())
    crc[_cd_records(crc)[0] + 16] ^= 1
    (tmp_path / "d.pt").write_bytes(crc)
    damaged["CRC"] = tmp_path / "d.pt"
    for what, path in damaged.items():
        with pytest.raises(FormatError, match=what) as err:
            inspect_torch_file(path, cache=cache)
        assert err.value.code == BAD_ARCHIVE


def test_memo_keeps_the_order_of_errors(real_files, tmp_path):
    src = real_files["state dict", "zip"]

    def past(r):
        r["data.pkl"] = r["data.pkl"].replace(b"K\x40t", b"K\x02t", 1)

    def past_and_missing(r):
        past(r)
        r.pop("data/1")

    only_past = _rezip(src, tmp_path / "a.pt", past)
    both = _rezip(src, tmp_path / "b.pt", past_and_missing)
    cache = ReadCache()
    for path, what in ((both, "is missing"), (only_past, "needs"), (both, "is missing"),
                       (only_past, "needs")):
        with pytest.raises(FormatError, match=what):
            inspect_torch_file(path, cache=cache)


@pytest.mark.parametrize("data", [_HASH_BOMB, _LAUGHS, b"\x80\x02cos\nsystem\n.",
                                  b"\x80\x02X\x10\x00\x00\x00abc"])
def test_refused_pickles_are_refused_again_from_the_memo(tmp_path, data):
    path = _zip_archive(tmp_path / "r.pt", data)
    cache = ReadCache()
    errors = []
    for _ in range(2):
        with pytest.raises(FormatError) as err:
            inspect_torch_file(path, cache=cache)
        errors.append((err.value.code, err.value.message))
    assert errors[0] == errors[1]


def test_check_pickle_is_part_of_the_memo_key(tmp_path):
    path = _zip_archive(tmp_path / "u.pt", b"\x80\x02cos\nsystem\nX\x01\x00\x00\x00x\x85R.")
    cache = ReadCache()
    assert inspect_torch_file(path, check_pickle=False, cache=cache).obj is None
    assert _code(path, cache=cache) == UNSAFE_PICKLE
    assert inspect_torch_file(path, check_pickle=False, cache=cache).obj is None


def test_memo_is_bounded(tmp_path, monkeypatch):
    memo = BoundedMemo(max_entries=3, max_weight=800)
    for i in range(5):
        memo.put(i, f"v{i}", 10)
    assert len(memo) == 3 and memo.get(0) is None and memo.get(4) == "v4"
    memo.get(2)  # now the most recently used
    memo.put(5, "v5", 10)
    assert memo.get(3) is None and memo.get(2) == "v2"
    memo.put(6, "heavy", 101)  # over an eighth of the budget: not kept
    assert memo.get(6) is None
    for i in range(10, 20):
        memo.put(i, "x", 100)
    assert memo.weight <= 800 and len(memo) <= 3
    memo.clear()
    assert len(memo) == 0 and memo.weight == 0

    cache = ReadCache()
    cache.pickles = BoundedMemo(2, 1 << 20)
    for i in range(4):
        _zip_archive(tmp_path / f"{i}.pt", b"\x80\x02K%c." % i)
        assert inspect_torch_file(tmp_path / f"{i}.pt", cache=cache).obj == i
    assert len(cache.pickles) == 2
    monkeypatch.setattr(torchsave.evaluation, "_MEMO_MAX_PICKLE", 3)
    cache.clear()
    assert inspect_torch_file(tmp_path / "0.pt", cache=cache).obj == 0
    assert len(cache.pickles) == 0  # a pickle over the size limit is not kept


# --- no torch ----------------------------------------------------------------------

def test_readers_import_no_framework(real_files, tmp_path):
    from safetensors.torch import save_file

    st_path = tmp_path / "a.safetensors"
    save_file({"w": torch.ones(2)}, str(st_path))
    script = f"""
import sys
for name in ("torch", "numpy", "safetensors", "transformers", "peft"):
    sys.modules[name] = None  # any import of them now fails
from ckpt_tools.formats import safetensors_header, torchsave
assert safetensors_header.read_header({str(st_path)!r}).names == ("w",)
for path in {[str(p) for p in real_files.values()]!r}:
    torchsave.flatten_tensors(torchsave.inspect_torch_file(path).obj)
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "numpy", "safetensors")
               and sys.modules[m] is not None)
assert not heavy, heavy
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
