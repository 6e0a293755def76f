"""Every input is bounded (issue 13, "What must hold" 5, cases 3-6 and the weak spots on parsing).

Each case is a run of three copies of a sound checkpoint whose middle one, ``checkpoint-2``,
holds a few hostile bytes: a count of 10**12 experts, a router of 10**10 rows stored in 4 bytes,
a regular expression that backtracks for ever, a dict of keys that collide in Python's hash, an
expert index of 5000 digits, a stride-0 view of gigabytes, a safetensors header of 4M keys, JSON
nested 100k deep. The real CLI reads each run in a child process held to 1.5 GB of address space
and 120 s (``run_limited``: a hang or a blow-up fails the test instead of stalling it); the
hostile file must get one problem naming it, and the sound checkpoints beside it must be judged
exactly as without it.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
import torch
from test_reliability_hostile import run_limited, zip_archive

from ckpt_tools import layout, patterns
from ckpt_tools.formats import safetensors_header as sh
from ckpt_tools.formats import torchsave
from ckpt_tools.problems import (BAD_ARCHIVE, BAD_CONFIG, BAD_HEADER, BAD_JSON, BAD_NAME,
                                 EXPERT_COUNT_MISMATCH, EXPERT_MISSING, UNSAFE_PICKLE, FormatError)

GUARD_S = 120
HOSTILE = "checkpoint-2"
SIBLINGS = ("checkpoint-1", "checkpoint-3")
ADAPTER_CONFIG = "peft_adapters/expert_1/adapter_config.json"
CATASTROPHIC = "([a-z_.0-9]+)+X"   # exponential backtracking on any module name


# --- building the runs -----------------------------------------------------------------------

def _run_of(results: Path, template: str, run: Path) -> Path:
    for name in (*SIBLINGS, HOSTILE):
        shutil.copytree(results / template, run / name, symlinks=True)
    return run / HOSTILE


def _edit_json(path: Path, **changes) -> None:
    doc = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            doc.pop(key, None)
        else:
            doc[key] = value
    path.write_text(json.dumps(doc), encoding="utf-8")


def _undeclared_count(ck: Path) -> None:
    """No config states the number of experts: the router's rows are all there is."""
    for rel in ("dylo_moe_state/config.json", "config.json"):
        _edit_json(ck / rel, num_experts=None, _dylora_num_experts=None)


def hash_flooding_archive(n: int = 150_000) -> bytes:
    """A torch.save archive of one dict of ``n`` int keys that all hash to 0 in Python."""
    step = 2**61 - 1  # hash(k * (2**61 - 1)) == 0 for every int k
    out = bytearray(b"\x80\x02}(")
    for k in range(1, n + 1):
        v = k * step
        raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
        out += b"\x8a" + bytes([len(raw)]) + raw + b"K\x00"
        if k % 1000 == 0:
            out += b"u("
    out += b"u."
    return zip_archive(bytes(out), prefix="skill_library")


def tiny_keys_header(n: int = 4_000_000) -> bytes:
    """A safetensors file whose header (~55 MB, under the 100 MB cap) lists ``n`` keys."""
    body = ("{" + ",".join(f'"k{i:07d}":0' for i in range(n)) + "}").encode()
    body += b" " * (-len(body) % 8)
    return len(body).to_bytes(8, "little") + body


NESTED_JSON = b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
HUGE_EXPERT = "9" * 5000


def _rename_expert_key(path: Path, digits: str) -> None:
    sd = torch.load(path, weights_only=True)
    key = next(k for k in sd if ".lora_A.expert_0." in k)
    sd[key.replace(".expert_0.", f".expert_{digits}.")] = sd.pop(key)
    torch.save(sd, path)


def _expand_expert_0(path: Path, rank: int = 12_000_000) -> None:
    """expert 0's LoRA tensors as stride-0 views of one float: 3.1 GB described by 4 bytes each."""
    sd = torch.load(path, weights_only=True)
    for key in list(sd):
        if ".lora_A.expert_0." in key:
            sd[key] = torch.zeros(1).expand(rank, sd[key].shape[1])
        elif ".lora_B.expert_0." in key:
            sd[key] = torch.zeros(1).expand(sd[key].shape[0], rank)
    torch.save(sd, path)


# name → (template, what to do to checkpoint-2, the file that must get the problem, its code,
# the status its siblings have)
CASES = {
    "num_experts 10**12": (
        "run_trainer/checkpoint-2",
        lambda ck: _edit_json(ck / "dylo_moe_state/config.json", num_experts=10**12),
        "dylo_moe_state/config.json", EXPERT_COUNT_MISMATCH, "redundant"),
    "router of 10**10 stride-0 rows, no count declared": (
        "run_trainer/checkpoint-2",
        lambda ck: (_undeclared_count(ck), torch.save(
            {"gate.weight": torch.zeros(1).expand(10**10, 32),
             "gate.bias": torch.zeros(1).expand(10**10)}, ck / "dylo_moe_state/router.pt")),
        "dylo_moe_state/router.pt", BAD_ARCHIVE, "redundant"),
    "router of 5000 real rows, no count declared": (
        "run_trainer/checkpoint-2",
        lambda ck: (_undeclared_count(ck), torch.save(
            {"gate.weight": torch.zeros(5000, 32), "gate.bias": torch.zeros(5000)},
            ck / "dylo_moe_state/router.pt")),
        "dylo_moe_state/router.pt", EXPERT_COUNT_MISMATCH, "redundant"),
    "target_modules regex that backtracks": (
        "run_trainer/checkpoint-2",
        lambda ck: _edit_json(ck / ADAPTER_CONFIG, target_modules=CATASTROPHIC),
        ADAPTER_CONFIG, BAD_CONFIG, "redundant"),
    "rank_pattern key that backtracks": (
        "run_trainer/checkpoint-2",
        lambda ck: _edit_json(ck / ADAPTER_CONFIG, rank_pattern={CATASTROPHIC: 4}),
        ADAPTER_CONFIG, BAD_CONFIG, "redundant"),
    "skill_library.pt dict of 150,000 colliding int keys": (
        "run_trainer/checkpoint-2",
        lambda ck: (ck / "dylo_moe_state/skill_library.pt").write_bytes(hash_flooding_archive()),
        "dylo_moe_state/skill_library.pt", BAD_ARCHIVE, "redundant"),
    "expert index of 5000 digits in a legacy file": (
        "legacy_v1/checkpoint-200",
        lambda ck: _rename_expert_key(ck / "pytorch_model.bin", HUGE_EXPERT),
        "pytorch_model.bin", EXPERT_COUNT_MISMATCH, "legacy"),
    "expert directory index of 200 digits": (
        "run_trainer/checkpoint-2",
        lambda ck: (ck / "peft_adapters/expert_2").rename(ck / f"peft_adapters/expert_{'7' * 200}"),
        f"peft_adapters/expert_{'7' * 200}", EXPERT_COUNT_MISMATCH, "redundant"),
    "stride-0 views of 3.1 GB in a v0 .bin": (
        "legacy_v0/checkpoint-100",
        lambda ck: _expand_expert_0(ck / "pytorch_model.bin"),
        "pytorch_model.bin", BAD_ARCHIVE, "legacy"),
    "safetensors header of 4M keys": (
        "run_trainer/checkpoint-2",
        lambda ck: (ck / "peft_adapters/expert_1/adapter_model.safetensors").write_bytes(
            tiny_keys_header()),
        "peft_adapters/expert_1/adapter_model.safetensors", BAD_HEADER, "redundant"),
    "config.json nested 100k deep": (
        "run_trainer/checkpoint-2",
        lambda ck: (ck / "config.json").write_bytes(NESTED_JSON),
        "config.json", BAD_JSON, "redundant"),
    "a legacy sibling's config.json nested 100k deep": (
        "legacy_v1/checkpoint-100",
        lambda ck: (ck / "config.json").write_bytes(NESTED_JSON),
        "config.json", BAD_JSON, "legacy"),
}
MIGRATED = ("expert index of 5000 digits in a legacy file", "stride-0 views of 3.1 GB in a v0 .bin",
            "a legacy sibling's config.json nested 100k deep")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")[:50]


@pytest.fixture(scope="module")
def hostile_runs(results_tree, tmp_path_factory):
    """{case name: its run directory}, every one under one root."""
    results, _, _ = results_tree
    root = tmp_path_factory.mktemp("bounded") / "root"
    runs = {}
    for name, (template, spoil, _, _, _) in CASES.items():
        run = root / _slug(name)
        spoil(_run_of(results, template, run))
        runs[name] = run
    return runs


@pytest.fixture(scope="module")
def validated(hostile_runs):
    """validate of every hostile checkpoint, in one process: {case name: its JSON record}."""
    child = run_limited("validate", "--json", "--min-age", "0",
                        *(run / HOSTILE for run in hostile_runs.values()), timeout=GUARD_S)
    assert not child.guard_failures("validate"), child.stderr[-2000:]
    assert child.rc == 1
    by_root = {ck["root"]: ck for ck in child.json()["checkpoints"]}
    return {name: by_root[str(run / HOSTILE)] for name, run in hostile_runs.items()}


@pytest.fixture(scope="module")
def planned(hostile_runs):
    """What ``prune --dry-run`` of the whole root plans to delete."""
    root = next(iter(hostile_runs.values())).parent
    child = run_limited("prune", "--dry-run", "--json", "--min-age", "0", root, timeout=GUARD_S)
    assert not child.guard_failures("prune --dry-run"), child.stderr[-2000:]
    assert child.rc == 0
    return {d["path"] for d in child.json()["deleted"]}


def _errors(ck: dict) -> list[tuple[str, str]]:
    return [(p["code"], p["path"]) for p in ck["problems"] if p["severity"] == "error"]


@pytest.mark.parametrize("name", list(CASES))
def test_a_hostile_file_is_one_problem_on_it_and_the_rest_is_judged_as_without_it(
        name, hostile_runs, validated, planned):
    _, _, rel, code, sibling_status = CASES[name]
    run = hostile_runs[name]
    audit = run_limited("audit", "--json", "--min-age", "0", "--no-progress", run, timeout=GUARD_S)

    assert not audit.guard_failures("audit"), audit.stderr[-2000:]
    assert audit.rc == 1
    found = {ck["path"]: ck for ck in audit.json()["checkpoints"]}
    assert set(found) == {*SIBLINGS, HOSTILE}
    hostile = found[HOSTILE]
    assert hostile["status"] == "broken"
    assert (code, f"{HOSTILE}/{rel}") in _errors(hostile), hostile["problems"]
    for sibling in SIBLINGS:
        assert found[sibling]["status"] == sibling_status and not found[sibling]["problems"]

    v = validated[name]
    assert v["status"] == "broken" and (code, rel) in _errors(v), v["problems"]
    for p in hostile["problems"] + v["problems"]:  # one line each, naming no Python internals
        assert "\n" not in p["message"] and "Error" not in p["message"]
    in_run = {p for p in planned if p.startswith(f"{run.name}/")}
    if sibling_status == "redundant":
        assert in_run == {f"{run.name}/{s}/model.safetensors" for s in SIBLINGS}
    else:
        assert not in_run


def test_missing_experts_are_one_problem_with_their_ranges(results_tree, tmp_path):
    results, _, _ = results_tree
    ck = _run_of(results, "run_trainer/checkpoint-2", tmp_path / "run")
    _edit_json(ck / "dylo_moe_state/config.json", num_experts=layout.MAX_EXPERTS)
    shutil.rmtree(ck / "peft_adapters/expert_1")

    audit = run_limited("audit", "--json", "--min-age", "0", "--no-progress", tmp_path / "run",
                        timeout=GUARD_S)

    assert not audit.guard_failures("audit") and audit.rc == 1
    hostile = {ck["path"]: ck for ck in audit.json()["checkpoints"]}[HOSTILE]
    missing = [p for p in hostile["problems"] if p["code"] == EXPERT_MISSING]
    assert len(missing) == 1 and missing[0]["path"] == f"{HOSTILE}/peft_adapters"
    assert missing[0]["message"] == (f"{layout.MAX_EXPERTS - 2} of {layout.MAX_EXPERTS} experts "
                                     f"are missing: 1, 3-{layout.MAX_EXPERTS - 1}")


@pytest.mark.parametrize("name", MIGRATED)
def test_migrate_skips_the_hostile_checkpoint_and_migrates_the_others(name, hostile_runs, tmp_path):
    run = hostile_runs[name]
    dst = tmp_path / "dst"
    child = run_limited("migrate", "--json", "--min-age", "0", "--no-progress", run, dst,
                        timeout=GUARD_S)

    assert not child.guard_failures("migrate"), child.stderr[-2000:]
    assert child.rc == 0, child.stderr[-2000:]
    doc = child.json()
    _, _, _, code, _ = CASES[name]
    assert {m["source"] for m in doc["migrated"]} == set(SIBLINGS)
    assert [(s["source"], s["reason"].split(":")[0]) for s in doc["skipped"]] == [(HOSTILE, "broken")]
    assert code in doc["skipped"][0]["reason"]
    assert not doc["failed"] and not (dst / HOSTILE).exists()
    written = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    assert written < 4 * sum(f.stat().st_size for f in run.rglob("*") if f.is_file())


def test_a_step_of_more_digits_than_int64_is_a_warning_and_no_step(results_tree, tmp_path):
    results, _, _ = results_tree
    run = tmp_path / "run"
    long_name = "checkpoint-" + "1" * (layout.MAX_STEP_DIGITS + 12)
    shutil.copytree(results / "run_trainer/checkpoint-2", run / long_name, symlinks=True)
    shutil.copytree(results / "run_trainer/checkpoint-2", run / "checkpoint-2", symlinks=True)

    audit = run_limited("audit", "--json", "--min-age", "0", "--no-progress", run, timeout=GUARD_S)

    assert not audit.guard_failures("audit") and audit.rc == 0
    found = {ck["path"]: ck for ck in audit.json()["checkpoints"]}
    assert found[long_name]["step"] is None and found[long_name]["status"] == "redundant"
    assert [(p["code"], p["path"], p["severity"]) for p in found[long_name]["problems"]] == [
        (BAD_NAME, long_name, "warning")]
    assert found["checkpoint-2"]["step"] == 2 and not found["checkpoint-2"]["problems"]
    assert layout.checkpoint_step(long_name) is None and layout.step_out_of_range(long_name)
    assert layout.checkpoint_step("checkpoint-" + "9" * 5000) is None


def test_the_header_of_4m_keys_costs_memory_in_proportion(results_tree, tmp_path):
    """It took 1 GB of RSS (the whole object parsed before its first entry was judged)."""
    results, _, _ = results_tree
    ck = _run_of(results, "run_trainer/checkpoint-2", tmp_path / "run")
    path = ck / "peft_adapters/expert_1/adapter_model.safetensors"
    path.write_bytes(tiny_keys_header())

    audit = run_limited("audit", "--json", "--min-age", "0", "--no-progress", ck, timeout=GUARD_S)

    assert not audit.guard_failures("audit") and audit.rc == 1
    # the header's bytes, their text, the interpreter: about 2.2 times the 52 MB header
    assert audit.peak_rss_mb < 300, audit.peak_rss_mb


def test_a_header_listing_more_tensors_than_the_bound_is_refused(monkeypatch):
    entry = '{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    body = ("{" + ",".join(f'"t{i}":{entry}' for i in range(11)) + "}").encode()
    blob = len(body).to_bytes(8, "little") + body
    assert len(sh.parse_header(blob, len(blob)).tensors) == 11
    monkeypatch.setattr(sh, "MAX_TENSORS", 10)

    with pytest.raises(FormatError, match="more than 10 tensors") as err:
        sh.parse_header(blob, len(blob))
    assert err.value.code == BAD_HEADER
    assert sh.lenient_names(blob, limit=4) == [f"t{i}" for i in range(4)]


def test_the_streamed_header_reader_keeps_json_s_answers():
    good = b'{ "a" : {"dtype":"U8","shape":[1],"data_offsets":[0,1]} , "__metadata__":{"k":"v"} }  '
    header = sh.parse_header(len(good).to_bytes(8, "little") + good + b"x", 8 + len(good) + 1)
    assert header.names == ("a",) and header.metadata == {"k": "v"}
    entry = b'{"dtype":"U8","shape":[0],"data_offsets":[0,0]}'
    for text in (b'{"a" E}', b'{"a": E "b": E}', b'{"a": }', b'{"a": E} x', b"{,}", b'{"a": E,}',
                 b'{"a": E'):
        text = text.replace(b"E", entry)
        blob = len(text).to_bytes(8, "little") + text
        with pytest.raises(FormatError, match="not valid JSON") as err:
            sh.parse_header(blob, len(blob))
        with pytest.raises(ValueError):
            json.loads(text)
        assert err.value.code == BAD_HEADER


# --- torch.save bounds, one by one ---------------------------------------------------------------

def test_a_stride_0_view_is_sized_by_what_it_would_write(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"w": torch.zeros(1).expand(10**6, 32)}, path)
    with pytest.raises(FormatError, match="expanded view") as err:
        torchsave.inspect_torch_file(path)
    assert err.value.code == BAD_ARCHIVE

    legacy = tmp_path / "legacy.pt"
    torch.save({"w": torch.zeros(1).expand(10**6, 32)}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(FormatError, match="expanded view"):
        torchsave.inspect_torch_file(legacy)

    # what real checkpoints hold: tied weights, position_ids.expand(1, -1), a small broadcast
    w = torch.zeros(128, 32)
    torch.save({"embed": w, "lm_head": w, "pos": torch.arange(512).expand(1, -1),
                "mask": torch.ones(1).expand(1000)}, path)
    info = torchsave.inspect_torch_file(path)
    assert set(torchsave.flatten_tensors(info.obj)) == {"embed", "lm_head", "pos", "mask"}


def test_dicts_and_sets_of_colliding_keys_are_refused_and_large_sound_ones_accepted(tmp_path):
    path = tmp_path / "flood.pt"
    path.write_bytes(hash_flooding_archive(5000))
    with pytest.raises(FormatError, match="hash-flooding") as err:
        torchsave.inspect_torch_file(path)
    assert err.value.code == BAD_ARCHIVE

    sound = {"state": {i: {"step": i} for i in range(20_000)},
             "names": set(range(-5000, 5000)) | {-1, -2}, "floats": {i / 7: i for i in range(3000)}}
    torch.save(sound, path)
    info = torchsave.inspect_torch_file(path)
    assert len(info.obj["state"]) == 20_000 and len(info.obj["names"]) == 10_000


def test_a_pickle_memo_index_out_of_range_is_refused(tmp_path):
    path = tmp_path / "memo.pt"
    path.write_bytes(zip_archive(b"\x80\x02}p" + b"9" * 30 + b"\n."))
    with pytest.raises(FormatError, match="memo index") as err:
        torchsave.inspect_torch_file(path)
    assert err.value.code == BAD_ARCHIVE


def test_rng_state_is_judged_as_the_trainer_loads_it(results_tree, tmp_path):
    """The Trainer loads rng_state*.pth with torch.load(weights_only=True) and numpy's array
    allowed; training_args.bin nothing loads that way: it is checked as an archive only."""
    results, _, _ = results_tree
    ck = tmp_path / "checkpoint-2"
    shutil.copytree(results / "run_trainer/checkpoint-2", ck, symlinks=True)
    real = torchsave.inspect_torch_file(ck / "rng_state.pth", check_pickle=torchsave.TRAINER_RNG_GLOBALS)
    assert set(real.obj) >= {"python", "numpy", "cpu"}
    with pytest.raises(FormatError) as err:  # numpy's array is no plain value to torch itself
        torchsave.inspect_torch_file(ck / "rng_state.pth")
    assert err.value.code == UNSAFE_PICKLE

    # a pickle that calls what it built (a dtype) is refused, as torch's unpickler refuses it
    called = b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00u4\x85R)R."
    (ck / "rng_state_1.pth").write_bytes(zip_archive(called, prefix="rng_state_1"))
    (ck / "rng_state.pth").write_bytes(zip_archive(
        b"\x80\x02}X\x03\x00\x00\x00cpucposix\nsystem\nX\x04\x00\x00\x00true\x85Rs.",
        prefix="rng_state"))
    (ck / "training_args.bin").write_bytes(zip_archive(
        b"\x80\x02ctransformers.training_args\nTrainingArguments\n)\x81}b.", prefix="training_args"))

    audit = run_limited("audit", "--json", "--min-age", "0", "--no-progress", ck, timeout=GUARD_S)
    validate = run_limited("validate", "--json", "--min-age", "0", ck, timeout=GUARD_S)

    assert not audit.guard_failures("audit") + validate.guard_failures("validate")
    assert audit.rc == 0 and audit.json()["checkpoints"][0]["status"] == "redundant"
    v = validate.json()["checkpoints"][0]
    assert validate.rc == 1 and v["status"] == "broken"
    assert sorted(_errors(v)) == [(UNSAFE_PICKLE, "rng_state.pth"), (UNSAFE_PICKLE, "rng_state_1.pth")]


# --- PEFT's patterns under a time bound ------------------------------------------------------------

MODULES = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.10.mlp.down_proj"]


def test_patterns_keep_peft_s_meaning():
    from peft.utils.other import get_pattern_key

    by_list = patterns.match_modules(["q_proj", "mlp.down_proj"], None, None, MODULES)
    assert [by_list[m].targeted for m in MODULES] == [True, False, True, True]
    by_regex = patterns.match_modules(r".*\.(q|v)_proj", None, None, MODULES)   # run in a child
    assert [by_regex[m].targeted for m in MODULES] == [True, True, True, False]
    assert not patterns.match_modules("q_proj", None, None, MODULES)[MODULES[0]].targeted  # fullmatch

    ranks = {"layers.1.self_attn.q_proj": 8, r"layers\.\d+\.mlp\..*": 2, "v_proj": 6}
    found = patterns.match_modules(None, ranks, ranks, MODULES)
    for m in MODULES:
        peft_key = get_pattern_key(list(ranks), m)
        assert found[m].rank_key == (peft_key if peft_key in ranks else None), m
        assert found[m].alpha_key == found[m].rank_key


@pytest.mark.parametrize("field", ["target_modules", "rank_pattern", "alpha_pattern"])
def test_a_regex_that_backtracks_is_too_costly_and_names_its_field(field, forked):
    # a sound regular expression beside it (then each is tried alone, to name the costly one)
    args = {"target_modules": ["q_proj"], "rank_pattern": {r"v_pr.j|o_proj": 2}, "alpha_pattern": None}
    args[field] = CATASTROPHIC if field == "target_modules" else {CATASTROPHIC: 4}
    with pytest.raises(patterns.PatternTooCostly, match=f"^{field}: regular expression too costly"):
        patterns.match_modules(args["target_modules"], args["rank_pattern"], args["alpha_pattern"],
                               MODULES, seconds=0.5)
    assert forked  # evaluated in children, every one of them reaped (the fixture checks)


def test_names_of_plain_characters_are_matched_without_a_child(forked):
    patterns.match_modules(["q_proj"], {"layers.0.self_attn.q_proj": 8}, {"v_proj": 4}, MODULES)
    assert forked == []
