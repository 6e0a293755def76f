"""Low-rank extraction: decompositions against the exact SVD, and adapters that PEFT
loads onto the base and that reproduce the fine-tune.

Fine-tunes are made the way they are made in the wild: a PEFT LoRA on a tiny Llama built from
a config, with non-zero lora_B, merged by ``merge_and_unload`` and saved by ``save_pretrained``.
"""

from __future__ import annotations

import json
import logging
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors import safe_open
from transformers import LlamaConfig, LlamaForCausalLM

from ckpt_tools.migrate.lowrank import TensorSource, decompose, extract, main, write_adapter

HIDDEN, FFN, VOCAB = 64, 160, 96
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


# ----------------------------------------------------------------------------- helpers

def with_spectrum(m: int, n: int, spectrum: list[float], seed: int = 0) -> torch.Tensor:
    """An m×n float32 matrix whose singular values are exactly ``spectrum`` (then zeros)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(spectrum), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(spectrum), generator=g, dtype=torch.float64))
    s = torch.tensor(spectrum, dtype=torch.float64)
    return ((u * s) @ v.T).float()


def exact_rel_error(d: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(d.double())
    return math.sqrt(float((s[r:] ** 2).sum())) / float(s.norm())


def llama_config(**kw) -> LlamaConfig:
    cfg = dict(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
               max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(kw)
    return LlamaConfig(**cfg)


def fine_tune(base: LlamaForCausalLM, targets: list[str], r: int, seed: int) -> LlamaForCausalLM:
    """base + a rank-r LoRA with non-zero lora_B, merged into plain weights."""
    torch.manual_seed(seed)
    model = type(base)(base.config)
    model.load_state_dict(base.state_dict())
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    return peft_model.merge_and_unload().eval()


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@contextmanager
def captured_warnings():
    """Every warning and every logged WARNING+ record inside the block, as strings."""
    seen: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    handler = Grab(level=logging.WARNING)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield seen
        seen.extend(str(w.message) for w in caught)
    finally:
        root.removeHandler(handler)


def load_adapter(base_dir: Path, adapter_dir: Path, dtype=torch.float32):
    """PeftModel.from_pretrained on a fresh base; returns (model, warnings seen)."""
    base = LlamaForCausalLM.from_pretrained(base_dir, dtype=dtype).eval()
    with captured_warnings() as seen:
        model = PeftModel.from_pretrained(base, adapter_dir).eval()
    return model, seen


def peft_expected_state(base_dir: Path, adapter_dir: Path) -> dict[str, tuple]:
    """Key -> shape of the file PEFT's own save_pretrained writes for this adapter config."""
    config = LoraConfig.from_pretrained(str(adapter_dir))
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), config)
    return {k: tuple(v.shape) for k, v in get_peft_model_state_dict(model).items()}


def assert_clean_load(base_dir: Path, adapter_dir: Path, seen: list[str],
                      baseline: list[str]) -> None:
    """The adapter file holds exactly the tensors PEFT expects, and loading it warns of
    nothing beyond what an adapter written by PEFT itself warns of here."""
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), "pt") as f:
        written = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert written == peft_expected_state(base_dir, adapter_dir)
    assert sorted(set(seen) - set(baseline)) == []


def assert_adapter_reproduces(ex, base_dir: Path, adapter_dir: Path, models, ids,
                              baseline_warnings, tolerance: float = 1e-3) -> None:
    """``ex`` written to ``adapter_dir`` loads onto ``base_dir`` as cleanly as PEFT's own adapter,
    and its logits are the fine-tune's within ``tolerance`` of the fine-tune's change: ``models``
    are the (base, merged) pair the logits are measured on."""
    write_adapter(ex, adapter_dir)
    model, seen = load_adapter(base_dir, adapter_dir)
    assert_clean_load(base_dir, adapter_dir, seen, baseline_warnings)
    base, merged = models
    lb, lm, le = logits(base, ids), logits(merged, ids), logits(model, ids)
    assert float((le - lm).norm() / (lm - lb).norm()) <= tolerance


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (3, 24), generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="module")
def baseline_warnings(tmp_path_factory):
    """Warnings that loading an adapter written by PEFT itself gives in this environment."""
    d = tmp_path_factory.mktemp("baseline")
    torch.manual_seed(0)
    base = LlamaForCausalLM(llama_config()).eval()
    base.save_pretrained(d / "base")
    peft_model = get_peft_model(LlamaForCausalLM(llama_config()),
                                LoraConfig(r=2, target_modules=["q_proj"]))
    peft_model.save_pretrained(d / "adapter")
    _, seen = load_adapter(d / "base", d / "adapter")
    return seen


@pytest.fixture(scope="module")
def attn_bias_models(tmp_path_factory):
    """A base with attention biases and a fine-tune: rank-4 LoRA on q/k/v/o, a changed norm and
    a changed q_proj bias. Returns (dir, base, merged)."""
    d = tmp_path_factory.mktemp("attn-bias")
    torch.manual_seed(1)
    base = LlamaForCausalLM(llama_config(attention_bias=True)).eval()
    merged = fine_tune(base, ATTN, r=4, seed=2)
    with torch.no_grad():
        merged.model.norm.weight.add_(0.25)
        merged.model.layers[0].post_attention_layernorm.weight.mul_(1.5)
        merged.model.layers[1].self_attn.q_proj.bias.add_(0.3)
    base.save_pretrained(d / "base")
    merged.save_pretrained(d / "merged")
    return d, base, merged


# ----------------------------------------------------------------------------- decompose

@pytest.mark.parametrize("shape", [(300, 200), (200, 300)])
def test_decompose_gap_spectrum_is_randomized_and_within_1pct(shape):
    # rank 12 signal above a noise floor: the certificate holds without the exact SVD
    spectrum = [100.0 / (i + 1) for i in range(12)] + [0.05] * 150
    d = with_spectrum(*shape, spectrum, seed=3)
    for r in (4, 12):
        dec = decompose(d, rank=r)
        assert dec.rank == r and not dec.exact_used
        assert dec.A.shape == (r, shape[1]) and dec.B.shape == (shape[0], r)
        measured = float((d - dec.B @ dec.A).norm() / d.norm())
        assert measured == pytest.approx(dec.rel_error, rel=1e-3)
        assert measured <= 1.01 * exact_rel_error(d, r)


def test_decompose_factors_share_sqrt_singular_values():
    d = with_spectrum(80, 60, [9.0, 4.0, 1.0], seed=4)
    dec = decompose(d, rank=3)
    # A = diag(√s)Vᵀ and B = U·diag(√s): row norms of A equal column norms of B equal √s
    assert torch.allclose(dec.A.norm(dim=1), torch.tensor([3.0, 2.0, 1.0]), atol=1e-4)
    assert torch.allclose(dec.B.norm(dim=0), torch.tensor([3.0, 2.0, 1.0]), atol=1e-4)
    assert dec.rel_error < 1e-5


def test_decompose_falls_back_to_exact_when_it_cannot_certify():
    # a flat spectrum has no gap at r: the randomized answer cannot be proven within 1%
    g = torch.Generator().manual_seed(5)
    d = torch.randn(160, 160, generator=g)
    dec = decompose(d, rank=5)
    assert dec.exact_used
    assert dec.rel_error == pytest.approx(exact_rel_error(d, 5), rel=1e-4)
    forced = decompose(d, rank=5, method="randomized")
    assert not forced.exact_used
    # whatever the randomized answer is, the exact one is never worse
    assert dec.rel_error <= forced.rel_error * (1 + 1e-6)


def test_decompose_randomized_vs_exact_on_many_spectra():
    cases = [
        [1.0 / (i + 1) for i in range(200)],          # decaying: needs the wide sketch
        [10.0] * 6 + [1e-3] * 100,                    # exactly low rank + tiny noise
        [2.0 ** -i for i in range(40)],               # geometric
    ]
    for i, spectrum in enumerate(cases):
        d = with_spectrum(400, 300, spectrum, seed=10 + i)
        for r in (3, 8):
            dec = decompose(d, rank=r)
            exact = exact_rel_error(d, r)
            measured = float((d - dec.B @ dec.A).norm() / d.norm())
            assert measured <= 1.01 * exact + 1e-6, (i, r, dec.exact_used)


@pytest.mark.parametrize("energy, expected", [(0.5, 1), (0.8, 2), (0.95, 3), (0.99, 4),
                                              (0.999, 5)])
def test_decompose_energy_picks_the_smallest_rank(energy, expected):
    spectrum = [10.0, 6.0, 4.0, 2.0, 1.0] + [0.01] * 50
    total = sum(s * s for s in spectrum)
    cum = [sum(s * s for s in spectrum[:k]) / total for k in range(1, 7)]
    assert cum[expected - 1] >= energy and (expected == 1 or cum[expected - 2] < energy)
    d = with_spectrum(200, 150, spectrum, seed=6)
    dec = decompose(d, energy=energy)
    assert dec.rank == expected
    assert decompose(d, energy=energy, method="exact").rank == expected
    assert dec.rel_error ** 2 <= 1 - energy + 1e-6
    # rank caps the energy's rank
    assert decompose(d, energy=energy, rank=1).rank == 1


def test_decompose_zero_and_bad_input():
    assert decompose(torch.zeros(10, 8), rank=2) is None
    assert decompose(torch.zeros(10, 8).neg(), rank=2) is None      # -0.0 is still zero
    bad = torch.ones(10, 8)
    bad[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        decompose(bad, rank=2)
    with pytest.raises(ValueError):
        decompose(torch.ones(4, 4), rank=0)
    with pytest.raises(ValueError):
        decompose(torch.ones(4, 4))


def test_decompose_rank_larger_than_matrix_is_clamped():
    d = with_spectrum(30, 6, [3.0, 2.0, 1.0, 0.5, 0.25, 0.1], seed=8)
    dec = decompose(d, rank=16)
    assert dec.rank == 6 and dec.rel_error < 1e-5


# ----------------------------------------------------------------------------- extract + PEFT

def test_round_trip_reproduces_the_fine_tune(attn_bias_models, ids, baseline_warnings, tmp_path):
    d, base, merged = attn_bias_models
    ex = extract(d / "base", d / "merged", rank=4, device="cpu")
    assert sorted(ex.errors) == sorted(f"model.layers.{i}.self_attn.{m}" for i in range(2)
                                       for m in ATTN)
    assert ex.max_rel_error < 1e-5
    assert ex.adapter_config["target_modules"] == sorted(ex.errors)   # full names only
    assert ex.adapter_config["r"] == ex.adapter_config["lora_alpha"] == 4
    assert ex.adapter_config["lora_bias"] is True
    assert set(ex.modules_to_save) == {"model.norm", "model.layers.0.post_attention_layernorm"}
    # unchanged modules are left out
    assert "model.layers.0.mlp.up_proj" in ex.skipped
    assert not any("mlp" in k for k in ex.lora_state)
    bias = ex.lora_state["base_model.model.model.layers.1.self_attn.q_proj.lora_B.bias"]
    assert torch.allclose(bias, torch.full_like(bias, 0.3), atol=1e-6)
    assert_adapter_reproduces(ex, d / "base", tmp_path / "adapter", (base, merged), ids,
                              baseline_warnings)


def test_lower_rank_errors_match_the_exact_svd(attn_bias_models):
    d, base, merged = attn_bias_models
    ex = extract(d / "base", d / "merged", rank=2, device="cpu")
    bsd, msd = base.state_dict(), merged.state_dict()
    for module, err in ex.errors.items():
        delta = msd[module + ".weight"].float() - bsd[module + ".weight"].float()
        assert ex.ranks[module] == 2
        assert err <= 1.01 * exact_rel_error(delta, 2), module
        a = ex.lora_state[f"base_model.model.{module}.lora_A.weight"]
        b = ex.lora_state[f"base_model.model.{module}.lora_B.weight"]
        assert float((delta - b @ a).norm() / delta.norm()) == pytest.approx(err, rel=1e-3)


def test_energy_gives_per_module_ranks_that_peft_loads(tmp_path, ids, baseline_warnings):
    torch.manual_seed(11)
    base = LlamaForCausalLM(llama_config()).eval()
    merged = fine_tune(base, ["q_proj", "down_proj"], r=6, seed=12)
    with torch.no_grad():   # layer 1's q_proj gets a rank-1 delta only
        w = merged.model.layers[1].self_attn.q_proj.weight
        w.copy_(base.model.layers[1].self_attn.q_proj.weight
                + torch.outer(torch.randn(w.shape[0]), torch.randn(w.shape[1])))
    base.save_pretrained(tmp_path / "base")
    merged.save_pretrained(tmp_path / "merged")
    ex = extract(tmp_path / "base", tmp_path / "merged", energy=0.999999, device="cpu")
    assert ex.ranks["model.layers.1.self_attn.q_proj"] == 1
    assert ex.adapter_config["r"] == 6
    assert ex.adapter_config["rank_pattern"] == {"model.layers.1.self_attn.q_proj": 1}
    assert ex.adapter_config["alpha_pattern"] == {"model.layers.1.self_attn.q_proj": 1}
    assert_adapter_reproduces(ex, tmp_path / "base", tmp_path / "adapter", (base, merged), ids,
                              baseline_warnings)


def test_tied_embeddings_changed_embedding_round_trips(tmp_path, ids, baseline_warnings):
    torch.manual_seed(13)
    base = LlamaForCausalLM(llama_config(tie_word_embeddings=True)).eval()
    merged = fine_tune(base, ["v_proj"], r=2, seed=14)
    with torch.no_grad():
        merged.model.embed_tokens.weight[:10].add_(0.5)
    assert merged.lm_head.weight.data_ptr() == merged.model.embed_tokens.weight.data_ptr()
    base.save_pretrained(tmp_path / "base")
    merged.save_pretrained(tmp_path / "merged")
    ex = extract(tmp_path / "base", tmp_path / "merged", rank=2, device="cpu")
    assert ex.modules_to_save == ("model.embed_tokens",)
    assert ex.adapter_config.get("ensure_weight_tying") is True
    assert_adapter_reproduces(ex, tmp_path / "base", tmp_path / "adapter", (base, merged), ids,
                              baseline_warnings)


def test_bf16_fine_tune(tmp_path, ids, baseline_warnings):
    torch.manual_seed(15)
    base = LlamaForCausalLM(llama_config()).eval()
    merged = fine_tune(base, ["q_proj", "v_proj", "up_proj"], r=4, seed=16)
    base.to(torch.bfloat16).save_pretrained(tmp_path / "base")
    merged.to(torch.bfloat16).save_pretrained(tmp_path / "merged")
    ex = extract(tmp_path / "base", tmp_path / "merged", rank=4, device="cpu")
    assert all(t.dtype == torch.bfloat16 for t in ex.lora_state.values())
    # bf16 rounding of W and of A/B: each module is still close to its rank-4 optimum
    sb = TensorSource.open(tmp_path / "base")
    sm = TensorSource.open(tmp_path / "merged")
    for module, err in ex.errors.items():
        delta = sm.get(module + ".weight").float() - sb.get(module + ".weight").float()
        assert err <= exact_rel_error(delta, 4) + 2 ** -7, module
    ref_base = LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    ref_merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    assert_adapter_reproduces(ex, tmp_path / "base", tmp_path / "adapter", (ref_base, ref_merged),
                              ids, baseline_warnings, tolerance=2e-2)
    # asked for float32 factors, the same extraction gets closer
    ex32 = extract(tmp_path / "base", tmp_path / "merged", rank=4, device="cpu",
                   out_dtype="float32")
    assert all(t.dtype == torch.float32 for t in ex32.lora_state.values())
    assert ex32.max_rel_error <= ex.max_rel_error


def test_json_config_equals_what_peft_writes(attn_bias_models, tmp_path):
    d, _, _ = attn_bias_models
    ex = extract(d / "base", d / "merged", rank=3, device="cpu")
    write_adapter(ex, tmp_path / "peft", use_peft=True)
    write_adapter(ex, tmp_path / "json", use_peft=False)
    for d in ("peft", "json"):   # nothing but the two files: no temporary left behind
        assert sorted(p.name for p in (tmp_path / d).iterdir()) == [
            "adapter_config.json", "adapter_model.safetensors"]
    a = LoraConfig.from_pretrained(str(tmp_path / "peft")).to_dict()
    b = LoraConfig.from_pretrained(str(tmp_path / "json")).to_dict()
    assert a == b
    assert (tmp_path / "peft" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "json" / "adapter_model.safetensors").read_bytes()
    with safe_open(str(tmp_path / "json" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(ex.lora_state)


def test_sources_agree_dict_sharded_and_bin(attn_bias_models, tmp_path):
    d, base, merged = attn_bias_models
    merged.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    (tmp_path / "bin").mkdir()
    torch.save(base.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    ref = extract(d / "base", d / "merged", rank=4, device="cpu")
    for b_src, m_src in [(tmp_path / "bin", tmp_path / "sharded"),
                         (base.state_dict(), merged.state_dict())]:
        ex = extract(b_src, m_src, rank=4, device="cpu")
        assert ex.lora_state.keys() == ref.lora_state.keys()
        for k, v in ref.lora_state.items():
            assert torch.equal(ex.lora_state[k], v), k


def test_missing_and_extra_tensors_are_reported():
    g = torch.Generator().manual_seed(17)
    w0 = torch.randn(20, 10, generator=g)
    base = {"layer.proj.weight": w0, "old.weight": torch.ones(3)}
    merged = {"layer.proj.weight": w0 + with_spectrum(20, 10, [1.0]),
              "new.proj.weight": torch.ones(4, 4)}
    ex = extract(base, merged, rank=1, device="cpu")
    assert ex.missing == ("old.weight",) and ex.extra == ("new.proj.weight",)
    assert list(ex.errors) == ["layer.proj"]
    with pytest.raises(ValueError, match="shape"):
        extract(base, {"layer.proj.weight": torch.ones(20, 11)}, rank=1, device="cpu")


def test_a_config_that_is_no_json_object_is_refused_naming_the_file(tmp_path, capsys):
    """config.json is read by the same bounded reader as migrate's configs: a list, or a
    file that is not JSON, is one line naming it, not a crash further on."""
    from safetensors.torch import save_file
    for name, text in (("listed", "[1, 2]"), ("garbled", "{not json")):
        model = tmp_path / name
        model.mkdir()
        save_file({"a.proj.weight": torch.ones(4, 4)}, str(model / "model.safetensors"))
        (model / "config.json").write_text(text)
        with pytest.raises(ValueError, match=r"config\.json: not a JSON object"):
            TensorSource.open(model)
        assert main([str(model), str(model), str(tmp_path / "out"), "--rank", "1"]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"{model}/config.json" in err, err


def test_nothing_changed_writes_nothing(tmp_path):
    w = {"a.proj.weight": torch.ones(4, 4), "a.norm.weight": torch.ones(4)}
    ex = extract(w, dict(w), rank=2, device="cpu")
    assert ex.errors == {} and ex.skipped == ("a.proj",) and ex.modules_to_save == ()
    with pytest.raises(ValueError, match="nothing to write"):
        write_adapter(ex, tmp_path / "out")


def test_cli_writes_an_adapter(attn_bias_models, tmp_path, capsys):
    d, _, _ = attn_bias_models
    out = tmp_path / "cli"
    assert main([str(d / "base"), str(d / "merged"), str(out), "--rank", "4", "--device", "cpu",
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["modules"] == 8 and summary["max_rel_error"] < 1e-5
    assert (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert main([str(d / "base"), str(tmp_path / "nowhere"), str(out), "--rank", "4"]) == 1


def test_bias_only_change_gets_a_zero_rank_1_layer(tmp_path, ids, baseline_warnings):
    torch.manual_seed(19)
    base = LlamaForCausalLM(llama_config(attention_bias=True)).eval()
    merged = fine_tune(base, ["q_proj"], r=2, seed=20)
    with torch.no_grad():
        merged.model.layers[1].self_attn.k_proj.bias.add_(0.5)
    base.save_pretrained(tmp_path / "base")
    merged.save_pretrained(tmp_path / "merged")
    ex = extract(tmp_path / "base", tmp_path / "merged", rank=2, device="cpu")
    k = "model.layers.1.self_attn.k_proj"
    assert ex.ranks[k] == 1 and ex.adapter_config["rank_pattern"] == {k: 1}
    assert not ex.lora_state[f"base_model.model.{k}.lora_A.weight"].any()
    assert ex.notes == ()           # every target has a bias in the base: no PEFT warning
    assert_adapter_reproduces(ex, tmp_path / "base", tmp_path / "adapter", (base, merged), ids,
                              baseline_warnings)


def test_bias_delta_next_to_a_biasless_target_is_noted():
    g = torch.Generator().manual_seed(21)
    base = {"l.a.weight": torch.randn(8, 6, generator=g), "l.a.bias": torch.zeros(8),
            "l.b.weight": torch.randn(8, 8, generator=g)}
    merged = dict(base, **{"l.a.bias": torch.ones(8),
                           "l.b.weight": base["l.b.weight"] + with_spectrum(8, 8, [1.0])})
    ex = extract(base, merged, rank=1, device="cpu")
    assert ex.adapter_config["lora_bias"] is True
    assert torch.equal(ex.lora_state["base_model.model.l.a.lora_B.bias"], torch.ones(8))
    assert torch.equal(ex.lora_state["base_model.model.l.b.lora_B.bias"], torch.zeros(8))
    assert any("no bias in the base" in n for n in ex.notes)


def test_worker_count_does_not_change_the_result(attn_bias_models):
    d, _, _ = attn_bias_models
    one = extract(d / "base", d / "merged", rank=3, device="cpu", prefetch=False)
    many = extract(d / "base", d / "merged", rank=3, device="cpu", workers=3)
    assert one.lora_state.keys() == many.lora_state.keys()
    assert all(torch.equal(one.lora_state[k], many.lora_state[k]) for k in one.lora_state)
