"""Reading tensors by location: the names ``tensor_bytes`` gives a torch.save tree are the names
``tensor_io`` finds them under, also in a legacy (pre-1.6) file that is loaded whole."""

from __future__ import annotations

import pytest
import torch

from ckpt_tools.tensor_bytes import locate
from ckpt_tools.tensor_io import read_tensors


def _nested_tree() -> dict:
    g = torch.Generator().manual_seed(3)
    return {"gate_state_dict": {"weight": torch.randn(4, 8, generator=g)},
            "experts": [{"lora_A": torch.randn(2, 8, generator=g)},
                        {"lora_A": torch.randn(2, 8, generator=g)}],
            "step": 7,
            "pair": (torch.arange(3), torch.ones(2, dtype=torch.bfloat16))}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_every_located_tensor_is_read_back_under_its_dotted_name(tmp_path, legacy):
    tree = _nested_tree()
    path = tmp_path / "dylo_moe_weights.pt"
    torch.save(tree, path, _use_new_zipfile_serialization=not legacy)
    locations = locate(str(path))
    assert set(locations) == {"gate_state_dict.weight", "experts.0.lora_A", "experts.1.lora_A",
                              "pair.0", "pair.1"}
    assert all((loc.offset < 0) == legacy for loc in locations.values())
    got = read_tensors(locations)
    want = {"gate_state_dict.weight": tree["gate_state_dict"]["weight"],
            "experts.0.lora_A": tree["experts"][0]["lora_A"],
            "experts.1.lora_A": tree["experts"][1]["lora_A"],
            "pair.0": tree["pair"][0], "pair.1": tree["pair"][1]}
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
