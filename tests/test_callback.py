"""PeftOnlyCheckpointCallback and PEFT-only resume, on real Trainer runs of the tiny DyLoRA-MoE (CPU)."""

from __future__ import annotations

import errno
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from peft import PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402
from transformers.trainer_callback import PrinterCallback, ProgressCallback  # noqa: E402

import ckpt_tools  # noqa: E402
from ckpt_tools import layout  # noqa: E402
from ckpt_tools.errors import UsageError  # noqa: E402
from ckpt_tools.integrations import transformers as integration  # noqa: E402
from ckpt_tools.integrations.transformers import (PeftOnlyCheckpointCallback, PeftOnlyTrainer,  # noqa: E402
                                                  PeftTreeWriteError, UnsupportedModelError,
                                                  has_trainable_state_only)
from ckpt_tools.records import BROKEN, IN_PROGRESS, HEALTHY  # noqa: E402
from fixtures.dylora import DyLoRAMoE, Router, build_base, build_moe, expert_name, lora_config  # noqa: E402
from fixtures.trainer_run import TinyTokens  # noqa: E402

STEPS = 4


def training_args(output_dir: Path, **overrides) -> TrainingArguments:
    kw = dict(output_dir=str(output_dir), max_steps=STEPS, save_steps=2, save_strategy="steps",
              logging_steps=1, per_device_train_batch_size=4, learning_rate=5e-3,
              lr_scheduler_type="linear", warmup_steps=1, report_to=[], use_cpu=True, seed=0,
              data_seed=0, disable_tqdm=True, dataloader_num_workers=0, dataloader_pin_memory=False)
    kw.update(overrides)
    return TrainingArguments(**kw)


def make_trainer(moe, args, callback, trainer_cls=PeftOnlyTrainer, **kw):
    trainer = trainer_cls(model=moe, args=args, train_dataset=TinyTokens(seed=0), callbacks=[callback], **kw)
    for quiet in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(quiet)
    return trainer


def trained_tensors(moe) -> dict[str, torch.Tensor]:
    """The LoRA and router tensors, keyed as in the module's state dict."""
    return {k: v.detach().clone() for k, v in moe.state_dict().items() if ".lora_" in k or k.startswith("router.")}


def merged_files(ckpt: Path) -> list[str]:
    return sorted(n for n in os.listdir(ckpt) if layout.is_merged_name(n))


@dataclass
class Run:
    output_dir: Path
    moe: DyLoRAMoE
    callback: PeftOnlyCheckpointCallback
    final: dict[str, torch.Tensor]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Run:
    """4 steps, a checkpoint every 2, lora_dropout 0.05 (the fixture default)."""
    out = tmp_path_factory.mktemp("callback") / "run"
    moe = build_moe(seed=0)
    callback = PeftOnlyCheckpointCallback()
    make_trainer(moe, training_args(out), callback).train()
    return Run(out, moe, callback, trained_tensors(moe))


def test_the_callbacks_checkpoints_audit_peft_only_with_no_merged_weights(run):
    ckpts = sorted(run.output_dir.glob("checkpoint-*"))
    assert [c.name for c in ckpts] == ["checkpoint-2", "checkpoint-4"]
    for c in ckpts:
        assert merged_files(c) == []
        assert (c / layout.TRAINABLE_STATE).is_file()
        assert not [n for n in os.listdir(c) if layout.is_tmp_checkpoint_name(n)]
    assert [o.removed for o in run.callback.outcomes] == [("model.safetensors",)] * 2
    result = ckpt_tools.scan(str(run.output_dir), min_age_s=0)
    found = {c.path: c for c in result.checkpoints}
    assert set(found) == {"checkpoint-2", "checkpoint-4"}
    for c in found.values():
        assert (c.status, c.layout, c.num_experts, c.merged_files, c.problems) == \
               (HEALTHY, layout.CANONICAL, 3, (), ())
        assert c.reclaimable_bytes == 0
    assert ckpt_tools.plan_prune(result.checkpoints).deletions == ()


def _load_checkpoint(ckpt: Path, base):
    """(PeftModel with every expert, router state dict): ckpt_tools.load_checkpoint where it exists."""
    try:
        import ckpt_tools.loader  # noqa: F401
    except ImportError:
        adapters = ckpt / layout.PEFT_DIR
        model = PeftModel.from_pretrained(base, str(adapters / expert_name(0)), adapter_name=expert_name(0))
        for i in range(1, 3):
            model.load_adapter(str(adapters / expert_name(i)), adapter_name=expert_name(i))
        router = torch.load(ckpt / layout.MOE_STATE_DIR / layout.ROUTER_PT, weights_only=True)
        return model, router
    loaded = ckpt_tools.load_checkpoint(str(ckpt), base)
    return loaded.model, loaded.router_state


def test_the_last_checkpoint_reproduces_every_expert_and_the_router_exactly(run):
    moe = run.moe
    moe.eval()
    ids = TinyTokens(n=3, seed=5).ids
    model, router_state = _load_checkpoint(run.output_dir / "checkpoint-4", build_base("llama"))
    model.eval()
    assert set(router_state) == {"gate.weight", "gate.bias"}
    for k, v in moe.router.state_dict().items():
        assert torch.equal(router_state[k], v), k
    live = moe.foundation_model.base_model
    with torch.no_grad():
        try:
            for i in range(moe.num_experts):
                live.set_adapter(expert_name(i))
                model.set_adapter(expert_name(i))
                assert torch.equal(model(input_ids=ids).logits, moe.foundation_model(input_ids=ids).logits), i
        finally:
            live.set_adapter(moe.expert_names)
        router = Router(moe.hyper.hidden_size, moe.num_experts)
        router.load_state_dict(router_state)
        rebuilt = DyLoRAMoE(model, router, moe.hyper).eval()
        assert torch.equal(rebuilt(ids).logits, moe(ids).logits)


def test_resume_from_a_peft_only_checkpoint_continues_exactly(run, tmp_path):
    # The resumed model starts from other LoRA and router values (seed 1): only loading makes it match.
    moe = build_moe(seed=1)
    out = tmp_path / "resumed"
    trainer = make_trainer(moe, training_args(out), PeftOnlyCheckpointCallback())
    trainer.train(resume_from_checkpoint=str(run.output_dir / "checkpoint-2"))
    resumed = trained_tensors(moe)
    assert resumed.keys() == run.final.keys()
    # Bit-exact on CPU, dropout included: the Trainer restores the RNG state after skipping
    # the batches already seen, and loads the optimizer and scheduler from the checkpoint.
    assert [k for k in resumed if not torch.equal(resumed[k], run.final[k])] == []
    straight, again = run.output_dir / "checkpoint-4", out / "checkpoint-4"
    opt_a = torch.load(straight / "optimizer.pt", weights_only=True)
    opt_b = torch.load(again / "optimizer.pt", weights_only=True)
    for idx, st in opt_a["state"].items():
        for name, value in st.items():
            assert torch.equal(value, opt_b["state"][idx][name]), (idx, name)
    assert torch.load(straight / "scheduler.pt", weights_only=True) == \
           torch.load(again / "scheduler.pt", weights_only=True)
    ref = load_file(straight / layout.TRAINABLE_STATE)
    got = load_file(again / layout.TRAINABLE_STATE)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_a_tree_that_does_not_validate_keeps_the_merged_weights(tmp_path, monkeypatch):
    real = integration.write_expert_adapter

    def truncating(peft_model, adapter_name, dest, **kw):
        state = real(peft_model, adapter_name, dest, **kw)
        if adapter_name == expert_name(1):
            path = os.path.join(dest, layout.ADAPTER_WEIGHTS)
            os.truncate(path, os.path.getsize(path) // 2)
        return state

    monkeypatch.setattr(integration, "write_expert_adapter", truncating)
    out = tmp_path / "run"
    callback = PeftOnlyCheckpointCallback()
    make_trainer(build_moe(seed=0), training_args(out, max_steps=2), callback).train()
    ckpt = out / "checkpoint-2"
    assert merged_files(ckpt) == ["model.safetensors"]
    [outcome] = callback.outcomes
    assert outcome.written and not outcome.verified and outcome.kept == ("model.safetensors",)
    [c] = ckpt_tools.scan(str(out), min_age_s=0).checkpoints
    assert c.status == BROKEN and "truncated" in {p.code for p in c.errors}
    assert ckpt_tools.plan_prune([c]).deletions == ()
    assert not has_trainable_state_only(str(ckpt))   # resume goes through the Trainer's own loader


def test_a_tree_that_cannot_be_written_is_loud_and_keeps_the_merged_weights(tmp_path, monkeypatch):
    def full_disk(peft_model, adapter_name, dest, **kw):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(integration, "write_expert_adapter", full_disk)
    out = tmp_path / "run"
    with pytest.raises(PeftTreeWriteError):
        make_trainer(build_moe(seed=0), training_args(out, max_steps=2), PeftOnlyCheckpointCallback()).train()
    ckpt = out / "checkpoint-2"
    assert merged_files(ckpt) == ["model.safetensors"]
    left = set(os.listdir(ckpt))
    assert not left & {layout.PEFT_DIR, layout.MOE_STATE_DIR, layout.TRAINABLE_STATE, layout.ROOT_CONFIG}
    assert not [n for n in left if layout.is_tmp_checkpoint_name(n)]


def test_save_total_limit_keeps_the_last_two_peft_only_checkpoints(tmp_path):
    out = tmp_path / "run"
    make_trainer(build_moe(seed=0), training_args(out, save_steps=1, save_total_limit=2),
                 PeftOnlyCheckpointCallback()).train()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    statuses = {c.path: c.status for c in ckpt_tools.scan(str(out), min_age_s=0).checkpoints}
    assert statuses == {"checkpoint-3": HEALTHY, "checkpoint-4": HEALTHY}


@pytest.mark.parametrize("trainer_cls", [Trainer, PeftOnlyTrainer], ids=["Trainer", "PeftOnlyTrainer"])
def test_load_best_model_at_end_loads_the_best_peft_only_checkpoint(tmp_path, trainer_cls):
    # "best" is the highest eval loss, so that it is an early checkpoint, not the last one.
    out = tmp_path / "run"
    moe = build_moe(seed=0)
    args = training_args(out, save_steps=1, eval_strategy="steps", eval_steps=1, save_total_limit=2,
                         load_best_model_at_end=True, metric_for_best_model="eval_loss",
                         greater_is_better=True, per_device_eval_batch_size=4)
    trainer = make_trainer(moe, args, PeftOnlyCheckpointCallback(), trainer_cls,
                           eval_dataset=TinyTokens(n=4, seed=3))
    trainer.train()
    best = Path(trainer.state.best_model_checkpoint)
    assert best.name != f"checkpoint-{STEPS}"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == sorted([best.name, f"checkpoint-{STEPS}"])
    assert {c.status for c in ckpt_tools.scan(str(out), min_age_s=0).checkpoints} == {HEALTHY}
    saved = load_file(best / layout.TRAINABLE_STATE)
    now = trained_tensors(moe)
    assert saved.keys() == now.keys()
    assert [k for k in saved if not torch.equal(saved[k], now[k])] == []


def test_a_leftover_temporary_tree_is_in_progress_and_leaves_its_checkpoint_alone(run, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint-2"
    shutil.copytree(run.output_dir / "checkpoint-2", ckpt)
    tmp = ckpt / f"{layout.PEFT_TREE_TMP_PREFIX}4242"
    shutil.copytree(ckpt / layout.PEFT_DIR, tmp / layout.PEFT_DIR)
    found = {c.path: c.status for c in ckpt_tools.scan(str(tmp_path), min_age_s=0).checkpoints}
    assert found == {"run/checkpoint-2": HEALTHY, f"run/checkpoint-2/{tmp.name}": IN_PROGRESS}


# --------------------------------------------------------------------------- models it does not serve

def plain_peft_model():
    """LoRA on the tiny Llama, as ``peft.get_peft_model`` makes it: one adapter, ``default``."""
    return get_peft_model(build_base("llama"), lora_config())


NOT_SERVED = {"PeftModel": (plain_peft_model, "PeftModelForCausalLM", "already adapter-only"),
              "PreTrainedModel": (lambda: build_base("llama"), "LlamaForCausalLM", "no expert adapters")}


def assert_one_clear_line(error: UnsupportedModelError, given: str, why: str) -> None:
    message = str(error)
    assert "\n" not in message
    assert "serves a DyLoRA-MoE model" in message and "expert_0" in message
    assert f"given a {given}," in message and why in message
    assert isinstance(error, UsageError) and error.exit_code == 2
    # nothing chained: the user sees this exception alone, not the getter's AttributeError under it
    assert error.__cause__ is None and error.__suppress_context__


@pytest.mark.parametrize("trainer_cls", [Trainer, PeftOnlyTrainer], ids=["Trainer", "PeftOnlyTrainer"])
@pytest.mark.parametrize("kind", sorted(NOT_SERVED))
def test_a_model_the_callback_does_not_serve_fails_when_the_trainer_is_built(tmp_path, kind, trainer_cls):
    build, given, why = NOT_SERVED[kind]
    out = tmp_path / "run"
    with pytest.raises(UnsupportedModelError) as caught:
        make_trainer(build(), training_args(out), PeftOnlyCheckpointCallback(), trainer_cls)
    assert_one_clear_line(caught.value, given, why)
    assert list(out.glob("checkpoint-*")) == []


def test_a_callback_added_after_the_trainer_was_built_fails_before_the_first_step(tmp_path):
    out = tmp_path / "run"
    trainer = Trainer(model=plain_peft_model(), args=training_args(out), train_dataset=TinyTokens(seed=0))
    trainer.add_callback(PeftOnlyCheckpointCallback())
    with pytest.raises(UnsupportedModelError) as caught:
        trainer.train()
    assert_one_clear_line(caught.value, "PeftModelForCausalLM", "already adapter-only")
    assert trainer.state.global_step == 0
    assert list(out.glob("checkpoint-*")) == []


def test_a_dylora_model_the_getters_do_not_fit_is_refused_with_the_reason(tmp_path):
    out = tmp_path / "run"
    elsewhere = torch.nn.Linear(2, 2)   # a router that is not part of the model the Trainer trains
    with pytest.raises(UnsupportedModelError) as caught:
        make_trainer(build_moe(seed=0), training_args(out), PeftOnlyCheckpointCallback(get_router=lambda m: elsewhere))
    message = str(caught.value)
    assert "given a DyLoRAMoE, which is not one: the router is not a submodule" in message
    assert "\n" not in message
    assert list(out.glob("checkpoint-*")) == []
