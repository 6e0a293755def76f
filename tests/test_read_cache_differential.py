"""A verdict never depends on what was read before it.

Every checkpoint judged with ``cache=None`` (every file read and judged afresh) and through a
``ReadCache`` that earlier checkpoints filled must get exactly the same verdict: status,
layout, every problem (code, path, message, severity), merged files, expert count and facts.
Checked on the fixture tree, on the suite's hostile files and parser corpora placed beside
sound siblings, and on runs of sibling checkpoints of which some were mutated (one byte range,
one safetensors header, one pickle, one config), judged alone, together in one scan and with
forked workers.

``CKPT_TOOLS_DIFF_SIBLINGS`` (default 24) sets how many siblings each mutated run has and
``CKPT_TOOLS_DIFF_EXAMPLES`` (default 40) how many examples each hypothesis test draws.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_formats_safetensors import _REAL as _REAL_SAFETENSORS
from test_formats_safetensors import _mutations as _safetensors_mutations
from test_formats_torchsave import _DEFLATED_ZIP, _REAL_LEGACY, _REAL_ZIP, _mutations
from test_reliability_hostile import build_cases

import ckpt_tools
from ckpt_tools import api, checkpoint_reads, scanner
from ckpt_tools.formats import safetensors_header as sh
from ckpt_tools.formats import torchsave
from ckpt_tools.problems import FormatError
from ckpt_tools.read_cache import ReadCache
from ckpt_tools.validator import FULL, HEADERS, validate_checkpoint

SIBLINGS = int(os.environ.get("CKPT_TOOLS_DIFF_SIBLINGS", "24"))
EXAMPLES = int(os.environ.get("CKPT_TOOLS_DIFF_EXAMPLES", "40"))
FAR_FUTURE = 4e9  # every file old: nothing in progress
_WORK = tempfile.TemporaryDirectory(prefix="read-cache-diff-")


def _verdict(v) -> tuple:
    return (v.status, v.layout, tuple(v.problems), v.merged_files, v.num_experts, v.facts)


def _record(c) -> tuple:
    return (c.status, c.layout, tuple(c.problems), c.merged_files, c.num_experts, c.facts)


def _alone(root: Path, level: str = HEADERS, now: float = FAR_FUTURE) -> dict[str, tuple]:
    """Each checkpoint under ``root`` judged with no memo at all."""
    dirs, _ = scanner.find_checkpoints(str(root))
    return {d.path: _verdict(validate_checkpoint(d, level=level, now=now)) for d in dirs}


def _through(root: Path, cache: ReadCache, level: str = HEADERS,
             now: float = FAR_FUTURE) -> dict[str, tuple]:
    """Each checkpoint under ``root`` judged in turn through one ``cache``."""
    dirs, _ = scanner.find_checkpoints(str(root))
    return {d.path: _verdict(validate_checkpoint(d, level=level, now=now, cache=cache))
            for d in dirs}


def _template_sources(results_tree) -> dict[str, Path]:
    src, _, _ = results_tree
    return {"canonical": src / "run_trainer" / "checkpoint-2",
            "v3": src / "seed_v3" / "checkpoint-100"}


# --- the fixture tree ----------------------------------------------------------------

@pytest.mark.parametrize("level", [HEADERS, FULL])
def test_fixture_checkpoints_get_the_same_verdict_with_and_without_the_cache(results_tree, level):
    root, _, now = results_tree
    for min_age in (3600, 0):
        dirs, _ = scanner.find_checkpoints(str(root))
        fresh = [_verdict(validate_checkpoint(d, level=level, now=now, min_age_s=min_age))
                 for d in dirs]
        cache = ReadCache()
        for _ in range(2):  # the second pass is served by the memos wherever they apply
            assert [_verdict(validate_checkpoint(d, level=level, now=now, min_age_s=min_age,
                                                 cache=cache)) for d in dirs] == fresh
        # every checkpoint in reversed order too: what primes the memo changes
        cache = ReadCache()
        assert [_verdict(validate_checkpoint(d, level=level, now=now, min_age_s=min_age,
                                             cache=cache)) for d in reversed(dirs)] == fresh[::-1]
    scanned = ckpt_tools.scan(str(root), now=now, level=level, cache=None)
    cached = ckpt_tools.scan(str(root), now=now, level=level)  # a new cache of its own
    assert scanned.to_dict() == cached.to_dict()
    assert [_record(c) for c in scanned.checkpoints] == [_record(c) for c in cached.checkpoints]


# --- the suite's hostile files, beside sound siblings ----------------------------------

def test_hostile_files_get_the_same_verdict_with_and_without_the_cache(results_tree, tmp_path):
    templates = _template_sources(results_tree)
    sentinels = tmp_path / "sentinels"
    sentinels.mkdir()
    runs: dict[tuple[str, str], Path] = {}
    placed = 0
    for i, (case, content) in enumerate(build_cases(tmp_path, templates["canonical"])):
        if case.heavy:   # large files: their verdicts take seconds; the light cases cover the kinds
            continue
        run = runs.get((case.template, case.level))
        if run is None:
            run = runs[case.template, case.level] = tmp_path / f"{case.template}-{case.level}"
            for sibling in ("checkpoint-1", "checkpoint-2"):
                shutil.copytree(templates[case.template], run / sibling, symlinks=True)
        ck = run / f"checkpoint-{100 + i}"
        shutil.copytree(templates[case.template], ck, symlinks=True)
        target = ck / case.rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists() or target.is_symlink():
            target.unlink()
        target.write_bytes(content(sentinels / case.slug) if callable(content) else content)
        placed += 1
    assert placed > 20
    for (template, level), run in runs.items():
        fresh = _alone(run, level)
        assert _through(run, ReadCache(), level) == fresh, (template, level)
        assert sum(v[0] == "broken" for v in fresh.values()) > 0
    assert not any(sentinels.iterdir())


# --- the parser corpora: at the reader, and in a checkpoint beside sound siblings ------

def _inspect_outcome(path: Path, check, cache):
    try:
        info = torchsave.inspect_torch_file(path, check_pickle=check, cache=cache)
    except FormatError as exc:
        return exc.code, exc.message
    return info.format, repr(info.obj), info.storages, info.record_prefix


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(st.one_of(_mutations(_REAL_ZIP), _mutations(_REAL_LEGACY), _mutations(_DEFLATED_ZIP),
                 st.binary(max_size=300)))
def test_torch_corpus_reads_the_same_after_its_source_was_memoised(blob):
    seeds = Path(_WORK.name) / "seeds"
    seeds.mkdir(exist_ok=True)
    path = Path(_WORK.name) / "mutated.pt"
    path.write_bytes(blob)
    for check in (True, False, torchsave.TRAINER_RNG_GLOBALS):
        cache = ReadCache()
        for name, seed in (("zip", _REAL_ZIP), ("legacy", _REAL_LEGACY), ("deflated", _DEFLATED_ZIP)):
            (seeds / f"{name}.pt").write_bytes(seed)
            _inspect_outcome(seeds / f"{name}.pt", check, cache)
        through = _inspect_outcome(path, check, cache)
        assert through == _inspect_outcome(path, check, cache) == _inspect_outcome(path, check, None)


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(st.one_of(_safetensors_mutations(_REAL_SAFETENSORS), st.binary(max_size=100)))
def test_safetensors_corpus_reads_the_same_after_its_source_was_memoised(blob):
    def outcome(fn):
        try:
            return fn()
        except FormatError as exc:
            return exc.code, exc.message

    first = Path(_WORK.name) / "real.safetensors"
    first.write_bytes(_REAL_SAFETENSORS)
    path = Path(_WORK.name) / "mutated.safetensors"
    path.write_bytes(blob)
    cache = ReadCache()
    checkpoint_reads.read_header(str(first), "a/adapter.safetensors", None, cache)
    through = outcome(lambda: checkpoint_reads.read_header(str(path), "a/adapter.safetensors",
                                                           None, cache))
    assert through == outcome(lambda: checkpoint_reads.read_header(
        str(path), "a/adapter.safetensors", None, None)) == outcome(lambda: sh.read_header(path))


_IN_CHECKPOINT = ["dylo_moe_state/router.pt", "dylo_moe_state/skill_library.pt",
                  "peft_adapters/expert_1/adapter_model.safetensors",
                  "peft_adapters/expert_0/adapter_config.json", "dylo_moe_state/config.json",
                  "config.json"]


@pytest.fixture(scope="module")
def sibling_run(results_tree):
    """A run of three copies of the canonical fixture checkpoint; checkpoint-3 is mutated."""
    run = Path(_WORK.name) / "siblings"
    if not run.exists():
        for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3"):
            shutil.copytree(_template_sources(results_tree)["canonical"], run / name, symlinks=True)
    return run


@pytest.mark.fuzz
@settings(max_examples=EXAMPLES, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_corpus_mutations_in_a_checkpoint_get_the_same_verdict(sibling_run, data):
    rel = data.draw(st.sampled_from(_IN_CHECKPOINT))
    target = sibling_run / "checkpoint-3" / rel
    source = sibling_run / "checkpoint-1" / rel
    if not source.exists():
        return
    original = source.read_bytes()
    strategy = (_safetensors_mutations(original) if rel.endswith(".safetensors")
                else _mutations(original))
    blob = data.draw(strategy)
    target.unlink()
    try:
        target.write_bytes(blob)
        fresh = _alone(sibling_run)
        assert _through(sibling_run, ReadCache()) == fresh
    finally:
        target.unlink()
        target.write_bytes(original)


# --- runs of mutated siblings: alone, together, with workers -------------------------

def _mutate_byte_range(ck: Path, rng: random.Random) -> str:
    files = sorted(p for p in ck.rglob("*") if p.is_file() and p.suffix in (".pt", ".safetensors"))
    path = rng.choice(files)
    blob = bytearray(path.read_bytes())
    start = rng.randrange(len(blob))
    for at in range(start, min(len(blob), start + rng.randint(1, 16))):
        blob[at] ^= rng.randint(1, 255)
    _replace(path, bytes(blob))
    return f"bytes {path.relative_to(ck)}@{start}"


def _mutate_header(ck: Path, rng: random.Random) -> str:
    path = rng.choice(sorted(ck.rglob("*.safetensors")))
    blob = path.read_bytes()
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    name = rng.choice(sorted(k for k in header if k != "__metadata__"))
    how = rng.choice(["shape", "dtype", "offsets"])
    if how == "shape":
        header[name]["shape"] = [d + 1 for d in header[name]["shape"]]
    elif how == "dtype":
        header[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I8"])
    else:
        a, b = header[name]["data_offsets"]
        header[name]["data_offsets"] = [a, b + 4]
    raw = json.dumps(header).encode()
    _replace(path, len(raw).to_bytes(8, "little") + raw + blob[8 + n:])
    return f"header {path.relative_to(ck)} {name} {how}"


def _mutate_pickle(ck: Path, rng: random.Random) -> str:
    import torch
    path = ck / "dylo_moe_state" / "router.pt"
    state = torch.load(path, weights_only=True)
    gate = state.get("gate_state_dict", state)  # a V2 router dict holds its gate inside
    weight = next(k for k in gate if k.endswith("weight"))
    bias = next(k for k in gate if k.endswith("bias"))
    how = rng.choice(["rows", "extra", "bias", "count"])
    if how == "rows":
        gate[weight] = torch.zeros(gate[weight].shape[0] + 1, gate[weight].shape[1])
    elif how == "extra":
        gate[weight.replace("weight", "extra")] = torch.ones(3)
    elif how == "bias":
        gate[bias] = torch.zeros(gate[bias].shape[0] + 2)
    else:
        state["num_experts"] = int(state.get("num_experts", 4)) + 1
    path.unlink()
    torch.save(state, path)
    return f"pickle router.pt {how}"


def _mutate_config(ck: Path, rng: random.Random) -> str:
    choices = sorted(ck.glob("peft_adapters/*/adapter_config.json")) + [
        ck / "dylo_moe_state" / "config.json", ck / "config.json"]
    path = rng.choice([p for p in choices if p.exists()])
    cfg = json.loads(path.read_text())
    if path.name == "adapter_config.json":
        key = rng.choice(["r", "lora_alpha", "target_modules"])
        cfg[key] = {"r": cfg.get("r", 8) * 2, "lora_alpha": "high",
                    "target_modules": ["nothing_here"]}[key]
    else:
        key = next((k for k in ("num_experts", "_dylora_num_experts") if k in cfg), "num_experts")
        cfg[key] = int(cfg.get(key) or 4) + 1
    _replace(path, json.dumps(cfg).encode())
    return f"config {path.relative_to(ck)} {key}"


_MUTATIONS = (_mutate_byte_range, _mutate_header, _mutate_pickle, _mutate_config)


def _replace(path: Path, blob: bytes) -> None:
    path.unlink()  # copies may share inodes with their template: never write through a link
    path.write_bytes(blob)


@pytest.fixture(scope="module")
def mutated_runs(results_tree):
    """Two runs of SIBLINGS copies of a sound checkpoint (canonical, V3), a seeded third of
    each mutated: (root, {checkpoint path: mutation or None})."""
    root = Path(_WORK.name) / "mutated"
    rng = random.Random(20241214)
    mutations: dict[str, str | None] = {}
    for template, src in _template_sources(results_tree).items():
        for i in range(SIBLINGS):
            ck = root / f"run_{template}" / f"checkpoint-{(i + 1) * 10}"
            shutil.copytree(src, ck, symlinks=True)
            what = None
            if i > 0 and rng.random() < 0.34:
                what = rng.choice(_MUTATIONS)(ck, rng)
            mutations[f"run_{template}/checkpoint-{(i + 1) * 10}"] = what
    return root, mutations


def test_mutated_siblings_alone_together_and_with_workers_agree(mutated_runs, monkeypatch):
    root, mutations = mutated_runs
    alone = _alone(root)
    assert set(alone) == set(mutations)
    sound = {p for p, what in mutations.items() if what is None}
    # the mutations are real ones: most change the verdict of a sound copy of the same run
    # (not all: bytes of tensor data are never read, and must change nothing)
    assert all(alone[p][0] in ("healthy", "redundant") for p in sound)
    reference = {p.split("/")[0]: alone[p][:3] for p in sorted(sound)}
    mutated = [p for p, what in mutations.items() if what]
    changed = [p for p in mutated if alone[p][:3] != reference[p.split("/")[0]]]
    assert len(mutated) >= 4 and len(changed) >= len(mutated) // 2

    cache = ReadCache()
    together = ckpt_tools.scan(str(root), now=FAR_FUTURE, cache=cache)
    assert cache.recipes and cache.checks  # the memos were used
    assert {c.path: _record(c) for c in together.checkpoints} == alone

    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)  # forked workers even for a small tree
    cache = ReadCache()
    _through(root / "run_v3", cache)  # the workers inherit a primed cache
    workers = ckpt_tools.scan(str(root), now=FAR_FUTURE, jobs=2, cache=cache)
    assert {c.path: _record(c) for c in workers.checkpoints} == alone
    assert workers.to_dict() == together.to_dict() == ckpt_tools.scan(
        str(root), now=FAR_FUTURE, jobs=2, cache=None).to_dict()
