"""The audit's fast paths give exactly what the plain reads give.

Whole small torch.save archives memoised on the bytes the reader looks at, safetensors headers
taken from the last read at the same relpath, sizes from the scan's ``lstat`` instead of an
``fstat``, records built from the scanner's rows, forked workers, the JSON writer:
each is compared with the plain way on real files and on damaged ones.
"""

from __future__ import annotations

import errno
import io
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import tempfile
import struct
import threading
import zipfile
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save

import ckpt_tools
from ckpt_tools import api, checkpoint_reads, report, scanner, validator, workers
from ckpt_tools.formats import safetensors_header as sh
from ckpt_tools.formats import torchsave
from ckpt_tools.problems import UNREADABLE, FormatError
from ckpt_tools.read_cache import ReadCache
from ckpt_tools.records import CheckpointDir, FileRecord

REPO = Path(__file__).resolve().parents[1]
_WORK = tempfile.TemporaryDirectory(prefix="fast-paths-")


# --- torch.save: whole small archives memoised ---------------------------------------

def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _router(seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return _torch_bytes({"gate.weight": torch.randn(4, 8, generator=g),
                         "gate.bias": torch.randn(4, generator=g), "num_experts": 4})


_TEMPLATE = _router(0)


def _outcome(path: Path, check: bool, **kwargs):
    try:
        info = torchsave.inspect_torch_file(path, check_pickle=check, **kwargs)
    except FormatError as exc:
        return exc.code, exc.message
    return info.format, repr(info.obj), info.storages, info.record_prefix


def _memo_and_fresh(blob: bytes, check: bool):
    """(outcome with the template's archive memoised first, outcome with no memo at all)."""
    template = Path(_WORK.name) / "template.pt"
    template.write_bytes(_TEMPLATE)
    path = Path(_WORK.name) / "damaged.pt"
    path.write_bytes(blob)
    cache = ReadCache()
    torchsave.inspect_torch_file(template, check_pickle=check, cache=cache)
    memo = _outcome(path, check, cache=cache)
    return memo, _outcome(path, check)


def _payload(blob: bytes, name: str) -> range:
    with zipfile.ZipFile(io.BytesIO(blob)) as z:
        info = z.getinfo(name)
    name_len, extra_len = struct.unpack_from("<HH", blob, info.header_offset + 26)
    start = info.header_offset + 30 + name_len + extra_len
    return range(start, start + info.compress_size)


def test_every_single_byte_change_reads_as_a_fresh_read_would():
    # each byte of a real router.pt in turn, flipped: where the reader never looks (tensor
    # values, the serialization id, data descriptors, CRCs of records it does not read) the
    # memo answers; anywhere else the file is read again, and the outcome is the same
    template = Path(_WORK.name) / "template.pt"
    template.write_bytes(_TEMPLATE)
    path = Path(_WORK.name) / "one-byte.pt"
    for check in (True, False):
        cache = ReadCache()
        torchsave.inspect_torch_file(template, check_pickle=check, cache=cache)
        memo, served = {}, set()
        for at in range(len(_TEMPLATE)):
            blob = bytearray(_TEMPLATE)
            blob[at] ^= 0xFF
            path.write_bytes(blob)
            before = len(cache.archives)
            memo[at] = _outcome(path, check, cache=cache)
            if memo[at][0] == "zip" and len(cache.archives) == before:
                served.add(at)
        for at in range(len(_TEMPLATE)):
            blob = bytearray(_TEMPLATE)
            blob[at] ^= 0xFF
            path.write_bytes(blob)
            assert _outcome(path, check) == memo[at], at  # no cache: a fresh read
        for name in ("archive/data/0", "archive/data/1", "archive/.data/serialization_id"):
            assert set(_payload(_TEMPLATE, name)) <= served, name
        assert not served & set(_payload(_TEMPLATE, "archive/data.pkl"))


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_damaged_archives_read_as_fresh_reads_do(data):
    blob = bytearray(_TEMPLATE)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(blob) - 1))
        kind = data.draw(st.sampled_from(["flip", "zero", "copy"]))
        if kind == "flip":
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "zero":
            blob[at:at + 4] = b"\0" * len(blob[at:at + 4])
        else:  # a run of the file's own bytes, elsewhere: plausible headers in odd places
            src = data.draw(st.integers(0, len(blob) - 1))
            n = len(blob[at:at + 46])
            blob[at:at + n] = (bytes(blob[src:]) + bytes(n))[:n]
    for check in (True, False):
        memo, fresh = _memo_and_fresh(bytes(blob), check)
        assert memo == fresh


def test_archives_that_differ_in_tensor_values_share_one_read(tmp_path):
    cache = ReadCache()
    outcomes = []
    for seed in range(5):
        path = tmp_path / f"router-{seed}.pt"
        path.write_bytes(_router(seed))
        outcomes.append(_outcome(path, True, cache=cache))
    assert len(cache.archives) == 1  # the first was read; the others came from the memo
    assert len({o[:2] for o in outcomes}) == 1
    for seed in range(5):
        assert _outcome(tmp_path / f"router-{seed}.pt", True) == outcomes[seed]


def test_a_shared_result_is_shared_and_a_plain_one_is_the_callers(tmp_path):
    path = tmp_path / "r.pt"
    path.write_bytes(_TEMPLATE)
    cache = ReadCache()
    shared = torchsave.inspect_torch_file(path, shared=True, cache=cache)
    assert torchsave.inspect_torch_file(path, shared=True, cache=cache) is shared
    mine = torchsave.inspect_torch_file(path, cache=cache)
    assert mine == shared and mine.obj is not shared.obj and mine.storages is not shared.storages
    mine.obj["num_experts"] = 99
    mine.obj["gate.weight"] = None
    mine.storages.clear()
    again = torchsave.inspect_torch_file(path, cache=cache)
    assert again == shared and again.obj["num_experts"] == 4 and again.storages
    # without a cache nothing is shared: every call reads and builds its own
    assert torchsave.inspect_torch_file(path, shared=True) is not torchsave.inspect_torch_file(
        path, shared=True)


def test_file_size_from_the_caller_reads_the_same(tmp_path):
    path = tmp_path / "r.pt"
    path.write_bytes(_TEMPLATE)
    assert _outcome(path, True, file_size=len(_TEMPLATE)) == _outcome(path, True)
    expected = _outcome(path, True)
    # a file that grew since its size was taken: what was there then is what is read
    grown = tmp_path / "grown.pt"
    grown.write_bytes(_TEMPLATE + b"\0" * 10)
    assert _outcome(grown, True, file_size=len(_TEMPLATE)) == expected
    assert _outcome(grown, True)[0] == "bad-archive"


# --- safetensors: header bytes, and reads of a non-blocking descriptor -----------------

_ADAPTER = save({f"m.{i}.lora_A.weight": torch.zeros(4, 16) for i in range(8)},
                metadata={"format": "pt"})


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(st.data())
def test_header_from_the_last_read_equals_a_fresh_parse(data):
    # read_header answers from the header last read at the relpath when the bytes agree
    blob = bytearray(_ADAPTER)
    for _ in range(data.draw(st.integers(0, 3))):
        at = data.draw(st.integers(0, len(blob) - 1))
        blob[at] ^= 1 << data.draw(st.integers(0, 7))
    if data.draw(st.booleans()):
        del blob[data.draw(st.integers(0, len(blob) - 1)):]
    path = Path(_WORK.name) / "adapter.safetensors"
    first = Path(_WORK.name) / "first.safetensors"
    first.write_bytes(_ADAPTER)
    path.write_bytes(blob)
    cache = ReadCache()
    checkpoint_reads.read_header(str(first), "expert/adapter.safetensors", None, cache)

    def outcome(fn):
        try:
            return fn()
        except FormatError as exc:
            return exc.code, exc.message

    hinted = outcome(lambda: checkpoint_reads.read_header(
        str(path), "expert/adapter.safetensors", data.draw(st.sampled_from([None, len(blob)])),
        cache))
    assert hinted == outcome(lambda: sh.read_header(path))


def test_a_descriptor_that_answers_eagain_is_read_blocking(tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes(_ADAPTER)
    real = os.pread
    calls = []

    def pread(fd, n, offset):
        calls.append(os.get_blocking(fd))
        if len(calls) == 1:
            raise BlockingIOError(errno.EAGAIN, "try again")
        return real(fd, n, offset)

    fd, size = sh.open_regular(path)
    try:
        with mock.patch.object(sh.os, "pread", pread):
            data = sh.pread_full(fd, size, 0)
        assert data == _ADAPTER and calls == [False, True]
    finally:
        os.close(fd)


def test_special_files_are_refused_and_never_block(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as err:
        sh.open_regular(fifo)
    assert err.value.errno == errno.EINVAL
    # a size from an lstat that found a regular file where a FIFO now is: no hang either
    done = []
    thread = threading.Thread(target=lambda: done.append(_fifo_read(fifo)), daemon=True)
    thread.start()
    thread.join(10)
    assert done and isinstance(done[0], OSError)


def _fifo_read(path):
    try:
        sh.read_header_bytes(path, file_size=100)
    except (OSError, FormatError) as exc:
        return exc
    return None


# --- the scan: regular files, records from rows ---------------------------------------

def _canonical(root: Path) -> Path:
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gen_tree import generate
    finally:
        sys.path.remove(str(REPO / "bench"))
    generate(root, 6)
    return root


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory) -> Path:
    return _canonical(tmp_path_factory.mktemp("small") / "tree")


def _linked_copy(src: Path, dst: Path) -> None:
    """A copy of the tree made of hard links: replace a file before changing it."""
    shutil.copytree(src, dst, symlinks=True, copy_function=os.link)


def _replace(path: Path, data: bytes) -> None:
    stat = path.stat()
    path.unlink()
    path.write_bytes(data)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def test_a_fifo_in_a_checkpoint_is_unreadable_not_a_hang(small_tree, tmp_path):
    root = tmp_path / "tree"
    _linked_copy(small_tree, root)
    ckpt = root / "run_0000" / "checkpoint-200"
    cfg = ckpt / "dylo_moe_state" / "config.json"
    cfg.unlink()
    os.mkfifo(cfg)
    old = os.stat(ckpt / "config.json").st_mtime
    os.utime(cfg, (old, old))
    dirs, _ = scanner.find_checkpoints(str(root))
    rec = next(d for d in dirs if d.name == "checkpoint-200").file("dylo_moe_state/config.json")
    assert rec is not None and not rec.is_regular and not rec.is_symlink
    assert next(d for d in dirs if d.name == "checkpoint-100").file("config.json").is_regular
    for jobs in (1, 2):
        with mock.patch.object(api, "_MIN_PER_PROCESS", 1):
            result = ckpt_tools.scan(str(root), jobs=jobs, cache=ReadCache())
        broken = [c for c in result.checkpoints if c.status == "broken"]
        assert [c.name for c in (c.dir for c in broken)] == ["checkpoint-200"]
        assert [(p.code, p.path.rsplit("/", 2)[-2:], "not a regular file" in p.message)
                for p in broken[0].problems] == [(UNREADABLE, ["dylo_moe_state", "config.json"], True)]


def test_records_made_from_rows_are_the_records_of_those_rows(small_tree):
    # The scanner's values (what workers send back) make the same directory record as its
    # fields given one by one, FileRecords by keyword.
    root_abs = str(small_tree.resolve())
    path = next(p for p in sorted(small_tree.rglob("checkpoint-*")) if p.is_dir())
    values, _ = scanner.collect_rows(str(small_tree), root_abs, root_abs, str(path),
                                     list(os.scandir(path)))
    made = CheckpointDir.from_values(values)
    rows = values[5]
    by_field = CheckpointDir(
        root=values[0], path=values[1], run=values[2], name=values[3], step=values[4],
        files=tuple(FileRecord(**dict(zip(FileRecord._fields, r))) for r in rows),
        newest_mtime_ns=values[6], tmp_name=values[7], unreadable=values[8], dev=values[9],
        ino=values[10])
    copy = pickle.loads(pickle.dumps(made))
    assert made == by_field == copy and hash(made) == hash(by_field) and repr(made) == repr(by_field)
    assert all(type(f) is FileRecord for f in made.files + copy.files)
    config = made.file("config.json")
    assert config is not None and config.relpath == "config.json" and config.is_regular
    assert made.file("nothing") is None
    with pytest.raises(AttributeError):
        made.no_such_field  # noqa: B018


def test_total_size_counts_each_file_once_with_its_first_size():
    def ckpt(*rows):
        return CheckpointDir.from_values(("r", "p", ".", "p", None, rows, 0, False, (), 0, 0))

    def row(dev, ino, allocated):
        return (f"f{dev}-{ino}-{allocated}", 1, allocated, dev, ino, 2, 0, False, None, False,
                None, True)

    a = ckpt(row(1, 10, 4096), row(1, 11, 8192))
    b = ckpt(row(1, 10, 12288), row(1, 12, 4096))  # ino 10 again: a link, grown since
    c = ckpt(row(2, 10, 4096))                     # another filesystem's ino 10
    assert api._total_size([a, b]) == 4096 + 8192 + 4096
    assert api._total_size([a, b, c]) == 4096 + 8192 + 4096 + 4096
    assert api._total_size([b, a]) == 12288 + 4096 + 8192
    assert api._size(ckpt(row(1, 10, 4096), row(1, 10, 4096), row(1, 3, 1))) == 4097


# --- the validator: replayed verdicts on damaged checkpoints ---------------------------

_DAMAGE = ["dylo_moe_state/router.pt", "dylo_moe_state/skill_library.pt",
           "peft_adapters/expert_1/adapter_model.safetensors",
           "peft_adapters/expert_2/adapter_config.json", "dylo_moe_state/config.json",
           "config.json"]


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_verdicts_through_the_memos_equal_fresh_ones_on_damaged_files(small_tree, data):
    root = Path(tempfile.mkdtemp(dir=_WORK.name))
    try:
        _linked_copy(small_tree, root / "t")
        ckpt = root / "t" / "run_0000" / "checkpoint-500"
        target = ckpt / data.draw(st.sampled_from(_DAMAGE))
        blob = bytearray(target.read_bytes())
        for _ in range(data.draw(st.integers(1, 3))):
            at = data.draw(st.integers(0, len(blob) - 1))
            blob[at] ^= 1 << data.draw(st.integers(0, 7))
        _replace(target, bytes(blob))
        now = target.stat().st_mtime + 86400
        dirs, _ = scanner.find_checkpoints(str(root / "t"))
        cache = ReadCache()
        replayed = [vars(validator.validate_checkpoint(d, now=now, cache=cache))
                    for d in dirs]  # checkpoint-100..400 prime every memo first
        fresh = [vars(validator.validate_checkpoint(d, now=now)) for d in dirs]  # no memo
        assert replayed == fresh
    finally:
        shutil.rmtree(root, ignore_errors=True)


# --- workers --------------------------------------------------------------------------

def test_a_failing_worker_fails_the_scan_and_leaves_no_process(small_tree, monkeypatch, forked):
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)

    def boom(work, span):
        raise ValueError("a bug in a worker")

    monkeypatch.setattr(api._ScanWork, "run_span", boom)
    with pytest.raises(RuntimeError, match="a bug in a worker"):
        ckpt_tools.scan(str(small_tree), jobs=2)
    assert len(forked) == 2


def test_a_worker_that_dies_fails_the_scan(small_tree, monkeypatch, forked):
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)
    real = api._ScanWork.run_span

    def die(work, span):
        if span[0] > 0:
            os._exit(3)
        return real(work, span)

    monkeypatch.setattr(api._ScanWork, "run_span", die)
    with pytest.raises(RuntimeError, match="ended before its work was done"):
        ckpt_tools.scan(str(small_tree), jobs=2)
    assert len(forked) == 2


def test_many_spans_still_fit_in_one_write(small_tree, monkeypatch):
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)
    monkeypatch.setattr(workers, "MAX_SPANS", 1)  # all six checkpoints in one span
    one = ckpt_tools.scan(str(small_tree), jobs=1)
    assert ckpt_tools.scan(str(small_tree), jobs=3).to_dict() == one.to_dict()


# --- the JSON writer and the CLI -------------------------------------------------------

def _dumps_as_before(doc) -> str:
    if not isinstance(doc, dict):
        return json.dumps(doc, ensure_ascii=False)
    parts = []
    for key, value in doc.items():
        k = json.dumps(key, ensure_ascii=False)
        if isinstance(value, list) and value:
            items = ",\n".join("    " + json.dumps(v, ensure_ascii=False) for v in value)
            parts.append(f"  {k}: [\n{items}\n  ]")
        else:
            parts.append(f"  {k}: {json.dumps(value, ensure_ascii=False)}")
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20)


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(st.one_of(_JSON, st.dictionaries(st.text(), _JSON, max_size=5)))
def test_json_is_written_as_json_dumps_writes_it(doc):
    # but for DEL, C1 and U+2028/2029, which it escapes (a terminal may act on them raw)
    inert = re.sub("[\x7f-\x9f\u2028\u2029]", lambda m: f"\\u{ord(m.group()):04x}",
                   _dumps_as_before(doc))
    assert report.dumps(doc) == inert


def test_json_refuses_what_json_dumps_refuses():
    cycle: list = []
    cycle.append(cycle)
    for doc in ({"a": {1, 2}}, {"a": [object()]}, {"a": cycle}):
        with pytest.raises((TypeError, ValueError)) as ours:
            report.dumps(doc)
        with pytest.raises(type(ours.value)):
            _dumps_as_before(doc)


def test_audit_does_not_import_prune_or_migrate(small_tree):
    code = ("import sys, io, contextlib\n"
            "from ckpt_tools import cli\n"
            "with contextlib.redirect_stdout(io.StringIO()):\n"
            f"    rc = cli.main(['audit', '--json', {str(small_tree)!r}])\n"
            "print(rc, sorted(m for m in sys.modules if m.startswith('ckpt_tools.cli_')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split(None, 1) == ["0", "[]\n"]
    helped = subprocess.run([sys.executable, "-m", "ckpt_tools.cli", "--help"], capture_output=True,
                            text=True, check=True).stdout
    assert all(name in helped for name in ("audit", "validate", "prune", "migrate"))
