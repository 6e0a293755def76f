"""Names are data, never control (issue 13, cases 10 and 11).

A directory name is whatever bytes the file system holds: not UTF-8 (``b'run\\xff'``), or full
of terminal escapes (``ESC [2J``, OSC ... BEL) and newlines. Whatever the locale:

* every JSON document (``--json`` of each command, each ``--log`` line) is UTF-8 that a strict
  parser accepts, with no lone surrogate, and a name that is not UTF-8 carries its exact bytes
  in a ``<field>_bytes_b64`` field beside it, which leads back to the directory on disk;
* text output shows control characters as visible escapes: no ESC or BEL reaches the
  terminal, and no name starts a line of its own (a forged ``error:`` line in cron mail);
* ``prune --log`` prunes the tree, the oddly named checkpoints included.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckpt_tools.names import json_safe, json_text, shown, shown_lines
from test_prune import LOCK_NAME, ckpt_tools_exe

NOT_UTF8 = os.fsdecode(b"run\xff")                      # os.fsdecode: U+DCFF stands for 0xff
ESCAPES = "run\x1b[2J\x1b[31mRED"
FORGER = "forge\nerror: forged\nckpt-tools: error: forged\r"
PLAIN = "naïve run"                                      # UTF-8, not ASCII: shown as it is
OSC_LINK = "link\x1b]0;pwned\x07"                        # a symlink named with OSC ... BEL
OSC_TARGET = "outside\x1b]2;owned\x07\x9b31m"            # and pointing at such a name (with a C1 CSI)
RUNS = (NOT_UTF8, ESCAPES, FORGER, PLAIN)

# A UTF-8 locale, the C locale, and POSIX. This machine may lack a UTF-8 locale other than
# C.UTF-8, under which Python still writes with surrogateescape; PYTHONIOENCODING=utf-8:strict
# makes its streams what a de_DE.UTF-8 or en_US.UTF-8 locale gives them.
LOCALES = {
    "utf-8": {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PYTHONIOENCODING": "utf-8:strict"},
    "C": {"LANG": "C", "LC_ALL": "C"},
    "POSIX": {"LANG": "POSIX", "LC_ALL": "POSIX"},
}

# a \uD800-\uDFFF escape (not an escaped backslash followed by "udcff", as in an error's text)
_LONE_SURROGATE_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_CONTROL = re.compile("[\x00-\x09\x0b-\x1f\x7f-\x9f\u2028\u2029]")   # all but the newline
_FORGED = re.compile(r"^(ckpt-tools: )?error: forged", re.MULTILINE)
_TIMEOUT = 300   # a hang guard only


def cli(*args, env: str, timeout: float = _TIMEOUT) -> subprocess.CompletedProcess:
    """``ckpt-tools ARGS`` under locale ``env``; output kept as bytes."""
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith("LC_") and k not in ("LANG", "LANGUAGE", "PYTHONUTF8",
                                                         "PYTHONIOENCODING")}
    environ.update(LOCALES[env], HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([ckpt_tools_exe(), *map(str, args)], stdin=subprocess.DEVNULL,
                          capture_output=True, env=environ, timeout=timeout)


def odd_tree(results_tree, dest: Path) -> Path:
    """A root with a copy of the fixture's ``run_trainer`` (two redundant checkpoints) under
    each odd name, a symlink with OSC and BEL in its name and target, and one broken
    checkpoint (a truncated adapter) so that problem lines name an odd directory."""
    src, _, _ = results_tree
    root = dest / "results"
    root.mkdir(parents=True)
    for name in RUNS:
        shutil.copytree(src / "run_trainer", root / name, symlinks=True)
    target = dest / OSC_TARGET
    target.write_bytes(b"outside the root\n")
    os.symlink(target, root / ESCAPES / "checkpoint-2" / OSC_LINK)
    adapter = root / FORGER / "checkpoint-4" / "peft_adapters" / "expert_1" / "adapter_model.safetensors"
    with open(adapter, "r+b") as fh:
        fh.truncate(adapter.stat().st_size - 100)
    return root


@pytest.fixture(scope="module")
def shared_tree(results_tree, tmp_path_factory) -> Path:
    """One odd tree for the tests that only read it."""
    return odd_tree(results_tree, tmp_path_factory.mktemp("names"))


# --- checks ------------------------------------------------------------------------------

def strict_json(data: bytes, what: str):
    """``data`` parsed as a strict parser does: UTF-8 only, no lone surrogate."""
    text = data.decode("utf-8", "strict")
    assert not _LONE_SURROGATE_ESCAPE.search(data), f"{what}: a lone surrogate escape"
    assert not re.search(rb"[\x00-\x09\x0b-\x1f\x7f]|\xc2[\x80-\x9f]", data), \
        f"{what}: a raw control character in JSON"
    return json.loads(text)


def assert_inert(data: bytes, what: str) -> str:
    """Text output: valid UTF-8, no control character but the newline, no forged line."""
    text = data.decode("utf-8", "strict")
    bad = _CONTROL.search(text)
    assert bad is None, f"{what}: {bad.group()!r} reached the terminal: {text!r}"
    assert not _FORGED.search(text), f"{what}: a name started a line of its own: {text!r}"
    return text


def exact_bytes(item: dict, field: str) -> bytes:
    """The exact bytes of ``item[field]``: its ``_bytes_b64`` twin, or the UTF-8 of the text."""
    if f"{field}_bytes_b64" in item:
        return base64.b64decode(item[f"{field}_bytes_b64"], validate=True)
    return item[field].encode("utf-8")


def all_pairs(doc):
    """Every (dict, key, value) in a JSON document."""
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield doc, k, v
            yield from all_pairs(v)
    elif isinstance(doc, list):
        for v in doc:
            yield from all_pairs(v)


# --- JSON ---------------------------------------------------------------------------------

@pytest.mark.parametrize("env", LOCALES)
def test_audit_json_is_strict_utf8_and_each_path_leads_back_to_its_directory(shared_tree, env):
    proc = cli("audit", "--json", "--min-age", "0", shared_tree, env=env)
    assert proc.returncode == 1, proc.stderr      # the truncated adapter
    doc = strict_json(proc.stdout, "audit --json")
    found = set()
    for c in doc["checkpoints"]:
        path = exact_bytes(c, "path")
        assert os.path.isdir(os.path.join(os.fsencode(c["root"]), path)), c
        found.add(path)
        run = exact_bytes(c, "run")
        assert path.startswith(run + b"/")
        for p in c["problems"]:
            assert os.path.lexists(os.path.join(os.fsencode(c["root"]), exact_bytes(p, "path"))), p
    expected = {os.fsencode(r) + b"/checkpoint-" + s for r in RUNS for s in (b"2", b"4")}
    assert found == expected
    odd = next(c for c in doc["checkpoints"] if c["run"].startswith("run\ufffd"))
    assert odd["path"] == "run\ufffd/checkpoint-2" or odd["path"] == "run\ufffd/checkpoint-4"
    naive = [c for c in doc["checkpoints"] if c["run"] == PLAIN]
    assert len(naive) == 2 and all("path_bytes_b64" not in c for c in naive)   # only when needed
    for d, k, v in all_pairs(doc):
        if k.endswith("_bytes_b64"):
            assert "\ufffd" in d[k[:-len("_bytes_b64")]]


@pytest.mark.parametrize("env", LOCALES)
def test_prune_dry_run_json_and_log_are_strict_utf8(shared_tree, tmp_path, env):
    log = tmp_path / "prune.jsonl"
    proc = cli("prune", "--dry-run", "--json", "--min-age", "0", "--log", log, shared_tree, env=env)
    assert proc.returncode == 0, proc.stderr
    doc = strict_json(proc.stdout, "prune --dry-run --json")
    planned = {exact_bytes(d, "path") for d in doc["deleted"]}
    assert os.fsencode(NOT_UTF8) + b"/checkpoint-2/model.safetensors" in planned
    for path in planned:
        assert os.path.isfile(os.path.join(os.fsencode(shared_tree), path))
    lines = log.read_bytes().splitlines()
    assert lines, "nothing logged"
    logged = [strict_json(line, "--log line") for line in lines]
    plan_paths = {exact_bytes(e, "path") for e in logged if e["action"] == "plan"}
    assert {os.path.join(os.fsencode(shared_tree), p) for p in planned} == plan_paths


def test_validate_and_migrate_dry_run_json_are_strict_utf8(shared_tree, tmp_path):
    env = "utf-8"
    proc = cli("validate", "--json", "--min-age", "0", shared_tree, env=env)
    assert proc.returncode == 1, proc.stderr
    doc = strict_json(proc.stdout, "validate --json")
    for c in doc["checkpoints"]:
        assert os.path.isdir(os.path.join(os.fsencode(c["root"]), exact_bytes(c, "path")))
    proc = cli("migrate", "--dry-run", "--json", "--min-age", "0", shared_tree, tmp_path / "dst", env=env)
    assert proc.returncode == 0, proc.stderr
    doc = strict_json(proc.stdout, "migrate --dry-run --json")
    sources = {exact_bytes(i, "source") for i in doc["planned"] + doc["skipped"]}
    assert os.fsencode(NOT_UTF8) + b"/checkpoint-2" in sources
    for s in sources:
        assert os.path.isdir(os.path.join(os.fsencode(shared_tree), s))


def test_prune_log_never_crashes_and_every_redundant_checkpoint_is_pruned(results_tree, tmp_path):
    """The odd names are data: their checkpoints are pruned like any other."""
    root = odd_tree(results_tree, tmp_path)
    log = tmp_path / "prune.jsonl"
    proc = cli("prune", "--yes", "--json", "--min-age", "0", "--log", log, root, env="utf-8")
    assert proc.returncode == 0, proc.stderr
    doc = strict_json(proc.stdout, "prune --json")
    merged = {os.fsencode(r) + b"/checkpoint-" + s + b"/model.safetensors"
              for r in RUNS for s in (b"2", b"4")}
    broken = os.fsencode(FORGER) + b"/checkpoint-4/model.safetensors"
    assert {exact_bytes(d, "path") for d in doc["deleted"]} == merged - {broken}
    for m in merged:
        assert os.path.lexists(os.path.join(os.fsencode(root), m)) == (m == broken), m
    logged = [strict_json(line, "--log line") for line in log.read_bytes().splitlines()]
    deleted = {exact_bytes(e, "path") for e in logged if e["action"] == "delete"}
    assert deleted == {os.path.join(os.fsencode(root), m) for m in merged - {broken}}


def test_migrate_fails_a_checkpoint_named_in_bytes_that_are_not_utf8_and_migrates_the_rest(
        results_tree, tmp_path):
    """A documented limit (docs/migrate.md): its failure is one line, the rest is migrated."""
    src, _, _ = results_tree
    root = tmp_path / "src"
    for name in (NOT_UTF8, PLAIN):
        shutil.copytree(src / "run_trainer", root / name, symlinks=True)
    dst = tmp_path / "dst"
    proc = cli("migrate", "--json", "--min-age", "0", root, dst, env="utf-8")
    assert proc.returncode == 1, proc.stderr
    doc = strict_json(proc.stdout, "migrate --json")
    assert {exact_bytes(o, "source") for o in doc["failed"]} == {
        os.fsencode(NOT_UTF8) + b"/checkpoint-2", os.fsencode(NOT_UTF8) + b"/checkpoint-4"}
    assert {o["source"] for o in doc["migrated"]} == {f"{PLAIN}/checkpoint-2", f"{PLAIN}/checkpoint-4"}
    assert sorted(os.listdir(dst / PLAIN)) == ["checkpoint-2", "checkpoint-4"]
    assert not list((dst / NOT_UTF8).glob("*"))     # nothing left in DST for it


# --- text ---------------------------------------------------------------------------------

def test_text_output_of_a_tree_of_ascii_names_shows_the_newline_as_an_escape(results_tree, tmp_path):
    """Only ASCII in the names (no undecodable byte): the newline is still escaped."""
    root = tmp_path / "results"
    shutil.copytree(results_tree[0] / "run_trainer", root / FORGER, symlinks=True)
    for args in (("audit", "-v"), ("prune", "--dry-run", "-v"), ("validate", "-v")):
        proc = cli(*args, "--min-age", "0", root, env="C")
        assert proc.returncode == 0, proc.stderr
        out = assert_inert(proc.stdout, args[0])
        assert "forge\\nerror: forged\\nckpt-tools: error: forged\\r" in out, out


@pytest.mark.parametrize("env", LOCALES)
def test_text_output_shows_names_with_visible_escapes(shared_tree, tmp_path, env):
    runs = [("audit", "--min-age", "0", shared_tree),
            ("audit", "-v", "--min-age", "0", shared_tree),
            ("prune", "--dry-run", "-v", "--min-age", "0", shared_tree),
            ("prune", "--dry-run", "--min-age", "0", shared_tree),
            ("migrate", "--dry-run", "-v", "--min-age", "0", shared_tree, tmp_path / "dst")]
    if env == "utf-8":
        runs.append(("validate", "-v", "--min-age", "0", shared_tree))
    for args in runs:
        proc = cli(*args, env=env)
        what = " ".join(map(str, args[:2]))
        assert proc.returncode in (0, 1), (what, proc.stderr)
        out = assert_inert(proc.stdout, what)
        assert_inert(proc.stderr, what)
        assert "\\x1b[2J\\x1b[31mRED" in out, (what, out)      # the name is there, made visible
        assert "run\\xff" in out, (what, out)
        if args[0] != "migrate":      # migrate's dry run does not name the broken checkpoint
            assert "forge\\nerror: forged\\nckpt-tools: error: forged\\r" in out, (what, out)
        assert PLAIN in out, (what, out)
    proc = cli("audit", "-v", "--min-age", "0", shared_tree, env=env)
    out = proc.stdout.decode()
    assert "link\\x1b]0;pwned\\x07" in out and "\\x9b31m" in out, out   # the symlink's problem line


def test_a_real_prune_says_what_it_deleted_with_visible_escapes(results_tree, tmp_path):
    root = odd_tree(results_tree, tmp_path)
    proc = cli("prune", "--yes", "-v", "--min-age", "0", root, env="C")
    assert proc.returncode == 0, proc.stderr
    out = assert_inert(proc.stdout, "prune --yes -v")
    assert_inert(proc.stderr, "prune --yes -v")
    assert "deleted run\\xff/checkpoint-2/model.safetensors" in out, out
    assert "deleted run\\x1b[2J\\x1b[31mRED/checkpoint-4/model.safetensors" in out, out
    assert not os.path.lexists(root / NOT_UTF8 / "checkpoint-2" / "model.safetensors")


def test_skipped_and_failed_lines_on_stderr_stay_one_line_each(results_tree, tmp_path, monkeypatch,
                                                               capfd):
    """What cron mails: an execute-time skip or failure whose path and reason hold escapes."""
    from ckpt_tools import cli as cli_module
    from ckpt_tools.cli import prune as cli_prune
    from ckpt_tools.prune import Failure, PruneEvent, PruneResult
    root = odd_tree(results_tree, tmp_path)

    def execute(plan, *, on_event, **_):
        for d in plan.deletions:
            on_event(PruneEvent("skip", d.root, d.path, 0, "changed since the plan (\x1b[31m\nerror: forged)"))
        d = plan.deletions[0]
        on_event(PruneEvent("fail", d.root, d.path, 0, "cannot delete: \x07\nckpt-tools: error: forged"))
        return PruneResult((), (), (Failure(d.root, d.path, "cannot delete"),), 0, 0)

    monkeypatch.setattr(cli_prune, "execute_prune", execute)
    assert cli_module.main(["prune", "--yes", "-q", "--min-age", "0", str(root)]) == 1
    out, err = capfd.readouterr()
    err = assert_inert(err.encode(), "skipped and FAILED lines")
    assert_inert(out.encode(), "prune -q")
    lines = err.splitlines()
    assert sum(line.startswith("skipped: ") for line in lines) == 2 * len(RUNS) - 1   # one broken
    assert sum(line.startswith("FAILED: ") for line in lines) == 1
    assert "skipped: run\\xff/checkpoint-2/model.safetensors: changed since the plan " \
           "(\\x1b[31m\\nerror: forged)" in lines


@pytest.mark.parametrize("env", LOCALES)
def test_error_lines_name_the_root_on_one_line(tmp_path, env):
    missing = tmp_path / ("nope\nckpt-tools: error: forged\x1b[2J" + NOT_UTF8)
    for command in ("audit", "prune"):
        proc = cli(command, missing, env=env)
        assert proc.returncode == 2
        err = assert_inert(proc.stderr, command)
        assert err.count("\n") == 1 and err.startswith("ckpt-tools: error: "), err
        assert "nope\\nckpt-tools: error: forged\\x1b[2Jrun\\xff: no such file" in err
    outer = tmp_path / ("outer\nerror: forged")
    inner = outer / "inner\x07"
    inner.mkdir(parents=True)
    proc = cli("prune", "--dry-run", outer, inner, env=env)    # a click usage error
    assert proc.returncode == 2
    err = assert_inert(proc.stderr, "prune with nested roots")
    assert "inner\\x07" in err


@pytest.mark.parametrize("verbose", [False, True])
def test_an_unexpected_failure_quoting_a_name_is_shown_with_escapes(tmp_path, monkeypatch, capfd,
                                                                      verbose):
    from ckpt_tools import api, cli as cli_module
    name = f"{FORGER}\x1b[2J{NOT_UTF8}"

    def scan(*roots, **_):
        raise ValueError(f"cannot read {name}")

    monkeypatch.setattr(api, "scan", scan)
    assert cli_module.main(["audit", *(["-v"] if verbose else []), str(tmp_path)]) == 1
    out, err = capfd.readouterr()
    err = assert_inert(err.encode(), "the top-level handler")
    assert "ValueError: cannot read forge\\nerror: forged\\nckpt-tools: error: forged\\r\\x1b[2Jrun\\xff" in err
    assert err.count("\n") == 1 or verbose, err


def test_lock_held_line_in_cron_mail_is_one_line(results_tree, tmp_path):
    from ckpt_tools.locking import root_lock
    root = tmp_path / ("r\nerror: forged")
    shutil.copytree(results_tree[0] / "run_trainer", root / "run_trainer", symlinks=True)
    with root_lock([str(root)], 0):
        proc = cli("prune", "--yes", "-q", "--no-progress", "--min-age", "0", root, env="utf-8")
    assert proc.returncode == 75, proc.stderr
    err = assert_inert(proc.stderr, "prune with the lock held")
    assert err.count("\n") == 1 and f"r\\nerror: forged/{LOCK_NAME}" in err, err
    assert proc.stdout == b""


# --- the helpers, for any string ------------------------------------------------------

_NAMES = st.text(st.characters(blacklist_categories=()), max_size=40)   # surrogates included


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(_NAMES)
def test_shown_leaves_no_control_character_and_keeps_the_rest(name):
    text = shown(name)
    assert not _CONTROL.search(text)
    text.encode("utf-8", "strict")
    assert shown(text) == text
    if not re.search("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]", name):
        assert text == name


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(st.lists(_NAMES | st.text("ab\n\x1b ", max_size=6), max_size=5))
def test_shown_lines_escapes_each_line_and_joins_them_with_the_only_newlines(lines):
    assert shown_lines(lines).split("\n") == [shown(line) for line in lines] or lines == []


def test_a_newline_in_an_ascii_name_stays_inside_its_line():
    assert shown_lines(["Plan:", "  forge\nerror: forged/checkpoint-2  1 kB"]) == \
        "Plan:\n  forge\\nerror: forged/checkpoint-2  1 kB"


@pytest.mark.fuzz
@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["path", "root", "reason"]),
                       _NAMES | st.integers() | st.lists(_NAMES, max_size=3), max_size=3))
def test_json_text_is_strict_utf8_inert_and_reversible(doc):
    data = json_text(lambda d: json.dumps(d, ensure_ascii=False), doc).encode("utf-8", "strict")
    back = strict_json(data, "json_text")
    assert back == json.loads(json.dumps(json_safe(doc)))
    for key, value in doc.items():
        if isinstance(value, str):
            assert exact_bytes(back, key) == value.encode("utf-8", "surrogatepass" if any(
                "\ud800" <= c <= "\udbff" or "\udc00" <= c <= "\udc7f" for c in value)
                else "surrogateescape")
        else:
            assert back[key] == value or isinstance(value, list)
