"""The tensors of one model, read one at a time: a model directory, a weights file, a hub id
in the local Hugging Face cache, or a dict of tensors."""

from __future__ import annotations

import json
import mmap
import os
import threading
from collections.abc import Mapping
from pathlib import Path

import torch

from ..checkpoint_reads import MAX_JSON_BYTES
from ..formats.safetensors_header import open_readonly, read_header, require_regular
from ..layout import MERGED_INDEX, MERGED_SINGLE, ROOT_CONFIG
from ..tensor_io import SAFETENSORS_DTYPES
from .hub import NotCached, cached_snapshot
from .plan import read_json

OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
_INPUT_EMBEDDING_LEAVES = ("embed_tokens", "wte", "embed_in", "word_embeddings")


class BaseMismatch(ValueError):
    """The base given is not the fine-tune's: another architecture, or tensors of other shapes."""


class _SafetensorsFile:
    """Zero-copy tensors over a private (copy-on-write) mmap of one safetensors file."""

    def __init__(self, path: Path):
        header = read_header(path)
        self.path = path
        self.entries = {t.name: t for t in header.tensors}
        self.data_start = header.data_start
        self._mm: mmap.mmap | None = None
        self._lock = threading.Lock()

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        e = self.entries[name]
        dtype = SAFETENSORS_DTYPES.get(e.dtype)
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {name!r} has dtype {e.dtype}, which torch "
                             f"cannot read here")
        return dtype, tuple(e.shape)

    def tensor(self, name: str) -> torch.Tensor:
        dtype, shape = self.meta(name)
        e = self.entries[name]
        if e.end == e.begin:
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            if self._mm is None:
                fd = open_readonly(self.path)   # a FIFO in its place since is refused
                try:
                    self._mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    os.close(fd)
        return torch.frombuffer(self._mm, dtype=dtype, count=e.numel,
                                offset=self.data_start + e.begin).view(shape)

    def release(self, name: str) -> None:
        """Drop the pages of ``name`` from this process (they stay in the page cache), so
        that resident memory does not grow with the model. Views of it must be unused."""
        e = self.entries[name]
        if self._mm is None or e.end == e.begin:
            return
        page = mmap.PAGESIZE
        start = -(-(self.data_start + e.begin) // page) * page
        end = (self.data_start + e.end) // page * page
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)


class _DictFile:
    """Tensors already in memory (or memory-mapped): nothing to release."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self.path = None
        self.entries = dict(tensors)

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        t = self.entries[name]
        return t.dtype, tuple(t.shape)

    def tensor(self, name: str) -> torch.Tensor:
        return self.entries[name]

    def release(self, name: str) -> None:
        pass


class _TorchFile(_DictFile):
    """A torch.save'd state dict, opened with ``weights_only=True, mmap=True``."""

    def __init__(self, path: Path):
        require_regular(path)   # torch.load would block on a FIFO
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor)
                                                      for v in state.values()):
            raise ValueError(f"{path}: not a flat state dict of tensors")
        super().__init__(state)
        self.path = path


def _open_weights_file(path: Path):
    if path.suffix == ".safetensors":
        return _SafetensorsFile(path)
    return _TorchFile(path)


class TensorSource:
    """The tensors of one model, read one at a time and never all at once.

    ``TensorSource.open`` takes a model directory (``model.safetensors``, a sharded
    safetensors index, ``pytorch_model.bin`` or its index), a single weights file, a hub id
    already in the local Hugging Face cache, or a dict of tensors (for tests).
    """

    def __init__(self, files: list, *, path: Path | None = None, config: dict | None = None):
        self.path = path
        self.config = config
        self._where: dict[str, object] = {}
        for f in files:
            for name in f.entries:
                self._where.setdefault(name, f)

    @classmethod
    def open(cls, source) -> TensorSource:
        if isinstance(source, TensorSource):
            return source
        if isinstance(source, Mapping):
            return cls([_DictFile(source)])
        path = Path(source)
        if not path.exists():
            path = _from_hub_cache(str(source))
        if path.is_file():
            return cls([_open_weights_file(path)], path=path.resolve(), config=None)
        config = None
        if (path / ROOT_CONFIG).is_file():
            config = read_json(str(path / ROOT_CONFIG))
            if config is None:
                raise ValueError(f"{path / ROOT_CONFIG}: not a JSON object of at most "
                                 f"{MAX_JSON_BYTES} bytes")
        for index_name in MERGED_INDEX:
            index = path / index_name
            if index.is_file():
                weight_map = (read_json(str(index)) or {}).get("weight_map")
                if not isinstance(weight_map, dict):
                    raise ValueError(f"{index}: no weight_map")
                shards = sorted(set(weight_map.values()))
                return cls([_open_weights_file(path / s) for s in shards],
                           path=path.resolve(), config=config)
        for single in MERGED_SINGLE:
            if (path / single).is_file() and single.endswith((".safetensors", ".bin")):
                return cls([_open_weights_file(path / single)], path=path.resolve(),
                           config=config)
        raise FileNotFoundError(f"{path}: no model weights (looked for "
                                f"{', '.join(MERGED_INDEX + MERGED_SINGLE[:2])})")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def meta(self, name: str) -> tuple[torch.dtype, tuple[int, ...]]:
        return self._where[name].meta(name)

    def get(self, name: str) -> torch.Tensor:
        """The tensor, as stored (a zero-copy view for safetensors and mmapped .bin files)."""
        return self._where[name].tensor(name)

    def release(self, name: str) -> None:
        """Done with ``name``: its memory-mapped pages may leave this process."""
        self._where[name].release(name)

    def ties_embeddings(self) -> bool:
        """Does this model use its input embedding as lm_head?"""
        config = self.config or {}
        for cfg in (config, config.get("text_config") or {}):
            if "tie_word_embeddings" in cfg:
                return bool(cfg["tie_word_embeddings"])
        return input_embedding(self) is not None and not any(n in self for n in OUTPUT_EMBEDDINGS)


def _from_hub_cache(repo_id: str) -> Path:
    try:
        return Path(cached_snapshot(repo_id))
    except NotCached as exc:
        if exc.why is None:
            raise FileNotFoundError(f"{repo_id}: no such file or directory") from None
        raise FileNotFoundError(f"{repo_id}: not a directory and not in the local Hugging Face "
                                f"cache ({exc.why})") from None


def input_embedding(src: TensorSource) -> str | None:
    for name in src.names:
        parts = name.split(".")
        if len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in _INPUT_EMBEDDING_LEAVES:
            return name
    return None


# What makes two configs of one model_type different models: the same tensor names can then
# still have the same shapes (another depth: the extra layers would be left out unnoticed).
_ARCHITECTURE_KEYS = ("model_type", "architectures", "num_hidden_layers", "hidden_size",
                      "intermediate_size", "num_attention_heads", "num_key_value_heads")


def check_same_architecture(bsrc: TensorSource, msrc: TensorSource) -> None:
    """Raise ``BaseMismatch`` where both configs record an architecture key and differ."""
    b_cfg, m_cfg = bsrc.config or {}, msrc.config or {}
    for key in _ARCHITECTURE_KEYS:
        b_val, m_val = b_cfg.get(key), m_cfg.get(key)
        if b_val and m_val and b_val != m_val:
            raise BaseMismatch(f"{key} {json.dumps(b_val)} in the base but {json.dumps(m_val)} "
                               f"in the fine-tune")
