"""The Python API's exceptions speak of arguments (``base_model``, ``rank``), not of flags.

Each message that names an argument is an ``errors.Wording``: a Python caller reads the
argument's name, the command line its flag (``cli.exits.FLAGS``; its tests are in
test_cli_voice.py). One test per kind of exception that used to name a flag.
"""

from __future__ import annotations

import pickle

import pytest

from ckpt_tools.errors import Wording, message_of, spelled
from ckpt_tools.migrate import MigrateOptions, execute_migrate, plan_migrate
from fixtures.copying import copy_tree


def speaks_of_arguments(message: str, *names: str) -> None:
    assert "--" not in message, message
    for name in names:
        assert name in message, (name, message)
    assert isinstance(message, Wording) and set(names) <= set(message.arguments), message


# --- the mechanism -------------------------------------------------------------------------------

def test_a_wording_reads_with_argument_names_and_spells_them_as_asked():
    cause = Wording("give {rank:N} or {energy:F}")
    w = Wording("{path}: {cause}", path="/runs/{odd}/checkpoint-1", cause=cause)
    assert w == "/runs/{odd}/checkpoint-1: give rank or energy"   # data is never a template
    assert w.arguments == ("rank", "energy")
    assert w.spelled({"rank": "--rank", "energy": "--energy"}) == \
        "/runs/{odd}/checkpoint-1: give --rank N or --energy F"
    assert spelled("plain text", {"rank": "--rank"}) == "plain text"
    assert message_of(ValueError(w)) is w and message_of(ValueError("x")) == "x"
    again = pickle.loads(pickle.dumps(w))   # crosses a worker process whole
    assert again == w and again.arguments == w.arguments


# --- the loader -------------------------------------------------------------------------------------

def test_load_checkpoint_of_a_truly_merged_model_asks_for_rank_or_energy(results_tree):
    import ckpt_tools
    from ckpt_tools.loader import CheckpointLoadError
    root, manifest, _ = results_tree
    path = root / "merged_hf/merged_model"
    with pytest.raises(CheckpointLoadError) as info:
        ckpt_tools.load_checkpoint(path, str(manifest.base_model_dirs["llama"]))
    message = message_of(info.value)
    speaks_of_arguments(message, "rank", "energy")
    assert str(info.value) == f"{path}: a truly merged model: give rank or energy"


def test_an_svd_conversion_without_a_base_asks_for_base_model(results_tree):
    from ckpt_tools.migrate.errors import CheckpointFailure
    from ckpt_tools.migrate.extract import build_conversion, open_source
    from ckpt_tools.migrate.plan import METHOD_SVD
    root, _, _ = results_tree
    src = open_source(str(root / "merged_hf/merged_model"))
    with pytest.raises(CheckpointFailure) as info:
        build_conversion(src, METHOD_SVD, MigrateOptions(rank=4), check_merged=False)
    speaks_of_arguments(message_of(info.value), "base_model")


def test_a_base_model_that_is_not_the_checkpoints_says_base_model(results_tree):
    import torch

    from ckpt_tools.migrate.errors import CheckpointFailure
    from ckpt_tools.migrate.extract import open_source
    from ckpt_tools.migrate.peft_model import check_base_matches, load_base_model
    root, manifest, _ = results_tree
    src = open_source(str(next((root / "legacy_v1").glob("checkpoint-*"))))
    base = load_base_model(str(manifest.base_model_dirs["llama"]), dtype=torch.float32)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(1.0)
    with pytest.raises(CheckpointFailure) as info:
        check_base_matches(base, src)
    speaks_of_arguments(message_of(info.value), "verify")


# --- migrate's outcomes -------------------------------------------------------------------------

def test_verify_without_a_base_fails_the_checkpoint_naming_verify_and_base_model(results_tree,
                                                                                 tmp_path):
    root, _, _ = results_tree
    src = copy_tree(root / "run_best" / "checkpoint-100", tmp_path / "src" / "checkpoint-100")
    plan = plan_migrate(str(src.parent), str(tmp_path / "dst"),
                        MigrateOptions(verify=True, min_age_s=0))
    result = execute_migrate(plan)
    (failed,) = result.failed
    speaks_of_arguments(failed.reason, "verify", "base_model")
    assert not (tmp_path / "dst" / "checkpoint-100").exists()


def _extraction(**over):
    from ckpt_tools.migrate.extraction import Extraction, OverBound
    worst = OverBound("model.layers.0.mlp.down_proj", error=0.5, bound=0.01, rank=4,
                      needed_rank=32, full_rank=32, dtype="float32")
    fields = dict(lora_state={}, adapter_config={}, errors={worst.module: 0.5},
                  ranks={worst.module: 4}, max_rel_error=0.5, skipped=(), modules_to_save=(),
                  exact_fallbacks=0, missing=(), extra=(), notes=(), max_error=0.01,
                  over_bound=(worst,))
    return Extraction(**(fields | over))


def test_an_extraction_over_the_bound_names_max_error_rank_and_energy():
    from ckpt_tools.migrate.extract import _not_low_rank
    ex = _extraction()
    speaks_of_arguments(ex.over_bound_reason(), "max_error", "rank", "energy")
    skipped = _not_low_rank(ex, MigrateOptions(rank=4))
    speaks_of_arguments(message_of(skipped), "max_error")
    assert "above max_error 0.01" in str(skipped)
    assert "above --max-error 0.01" in spelled(message_of(skipped), {"max_error": "--max-error"})


# --- retention ------------------------------------------------------------------------------------

@pytest.mark.parametrize("rules, action, names", [
    ({}, "strip", ("strip", "keep_last", "keep_within")),
    ({"keep_last": 2}, None, ("strip", "delete")),
    ({"keep_steps": {100}}, None, ("keep_steps", "strip")),
])
def test_a_retention_policy_without_its_other_half_names_the_arguments(rules, action, names):
    from ckpt_tools.retention.rules import Policy, RetentionUsageError, Rules
    with pytest.raises(RetentionUsageError) as info:
        Policy.from_flags(Rules(**rules), action)
    speaks_of_arguments(message_of(info.value), *names)


# --- warnings a Python caller reads ------------------------------------------------------------------

def test_the_lora_alpha_guess_names_the_argument_and_the_command_line_the_flag(results_tree, tmp_path):
    """A legacy checkpoint records no lora_alpha: the loader's warning tells a Python caller to
    pass ``lora_alpha``; migrate on the command line tells the user to pass ``--lora-alpha``."""
    import json

    import ckpt_tools
    root, manifest, _ = results_tree
    loaded = ckpt_tools.load_checkpoint(root / "legacy_v0/checkpoint-100",
                                        str(manifest.base_model_dirs["llama"]))
    guess = [w for w in loaded.warnings if "guessed lora_alpha" in w]
    assert len(guess) == 1
    speaks_of_arguments(guess[0], "lora_alpha")
    assert "pass lora_alpha if training used another" in guess[0]

    from click.testing import CliRunner

    from ckpt_tools.cli import cli
    src = copy_tree(root / "legacy_v0", tmp_path / "src" / "legacy_v0")
    out = CliRunner().invoke(cli, ["migrate", "--json", "--no-progress", str(src.parent),
                                   str(tmp_path / "dst")])
    assert out.exit_code == 0, out.output
    warnings = [w for o in json.loads(out.stdout)["migrated"] for w in o.get("warnings", ())]
    assert warnings and all("pass --lora-alpha if training used another" in w
                            for w in warnings if "guessed" in w)
