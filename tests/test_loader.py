"""``ckpt_tools.load_checkpoint`` on every layout of the fixture tree."""

from __future__ import annotations

import os
import shutil

import pytest
import torch

import ckpt_tools
from ckpt_tools.loader import CheckpointLoadError
from test_migrate import (bits_equal, load_base, migratable, needs_lowrank, peft_keys,
                          random_ids, reference_logits, source_experts, source_router, tree_hashes)


@pytest.fixture(scope="module")
def source(results_tree, tmp_path_factory):
    """A private copy of the tree: loading must not write into it (checked by hashes)."""
    root, manifest, now = results_tree
    src = tmp_path_factory.mktemp("loader") / "src"
    shutil.copytree(root, src, symlinks=True)
    return src, manifest, tree_hashes(src)


def _exact_entries(manifest):
    return [e for e in migratable(manifest) if e.layout not in ("hf-merged", "model")]


def test_every_layout_loads_with_each_experts_logits_and_the_router(source):
    src, manifest, before = source
    ids = random_ids()
    layouts = set()
    for e in _exact_entries(manifest):
        base_dir = manifest.base_model_dirs[e.arch]
        lc = ckpt_tools.load_checkpoint(src / e.path, str(base_dir))
        from peft import PeftModel
        assert isinstance(lc.model, PeftModel)
        names = [f"expert_{i}" for i in range(e.num_experts)]
        assert sorted(lc.model.peft_config) == names == lc.expert_names
        want = source_experts(src / e.path)
        for i, name in enumerate(names):
            assert peft_keys(lc.model, name) == set(want[i]), (e.path, name)
            if e.deep_status == "broken":
                # a NaN in an adapter makes every logit NaN on both sides, so logits prove
                # nothing here: the loader must hand over exactly the tensors on disk
                from peft import get_peft_model_state_dict
                got = get_peft_model_state_dict(lc.model, adapter_name=name, save_embedding_layers=False)
                assert all(bits_equal(got[k], t) for k, t in want[i].items()), (e.path, name)
                continue
            lc.model.set_adapter(name)
            with torch.no_grad():
                out = lc.model(input_ids=ids).logits
            ref = reference_logits(base_dir, want[i], e.lora_r, e.lora_alpha, ids)
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6, msg=f"{e.path} {name}")
        router = source_router(src / e.path)
        assert set(lc.router_state) == {"gate.weight", "gate.bias"}
        for k, t in router.items():
            assert bits_equal(lc.router_state[k], t), (e.path, k)
        assert lc.config["num_experts"] == e.num_experts
        assert lc.num_experts == e.num_experts and lc.layout == e.layout
        layouts.add(e.layout)
    assert layouts >= {"canonical", "canonical+merged", "v0", "v1", "v2", "v3", "v4", "v5"}
    assert tree_hashes(src) == before, "load_checkpoint wrote into the checkpoint tree"


def test_a_built_model_is_accepted_as_base(source):
    src, manifest, _ = source
    e = manifest["legacy_v1/checkpoint-100"]
    base = load_base(manifest.base_model_dirs["llama"])
    lc = ckpt_tools.load_checkpoint(src / e.path, base)
    assert lc.model.get_base_model() is base
    assert sorted(lc.model.peft_config) == ["expert_0", "expert_1", "expert_2"]


def test_hub_id_resolves_from_the_local_cache_only(source, tmp_path, monkeypatch):
    import huggingface_hub.constants as hub_constants
    src, manifest, _ = source
    cache = tmp_path / "hub"
    repo = cache / "models--fixtures--tiny-llama"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(manifest.base_model_dirs["llama"], snap)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    lc = ckpt_tools.load_checkpoint(src / "seed_v4/checkpoint-100", "fixtures/tiny-llama")
    assert sorted(lc.model.peft_config) == ["expert_0", "expert_1"]
    with pytest.raises(CheckpointLoadError) as info:
        ckpt_tools.load_checkpoint(src / "seed_v4/checkpoint-100", "nobody/not-cached")
    assert "local Hugging Face cache" in str(info.value) and "\n" not in str(info.value)


def test_broken_checkpoint_is_refused_with_its_problem(source):
    src, manifest, _ = source
    broken = [e for e in manifest.values() if e.status == "broken" and not e.needs_non_root]
    with pytest.raises(CheckpointLoadError) as info:
        ckpt_tools.load_checkpoint(src / broken[0].path, str(manifest.base_model_dirs["llama"]))
    assert "broken" in str(info.value)


@needs_lowrank
def test_truly_merged_model_loads_as_one_extracted_expert(source):
    from transformers import AutoModelForCausalLM
    src, manifest, _ = source
    path = src / "merged_hf/merged_model"
    lc = ckpt_tools.load_checkpoint(path, str(manifest.base_model_dirs["llama"]), rank=4)
    assert sorted(lc.model.peft_config) == ["expert_0"]
    assert lc.router_state["gate.weight"].shape[0] == 1
    merged = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    merged.eval()
    ids = random_ids()
    with torch.no_grad():
        torch.testing.assert_close(lc.model(input_ids=ids).logits, merged(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-4)
    assert not [p for p in os.listdir(path) if p.startswith(".ckpt-tools")]
