"""What the torch.save reader reports (``TensorRef``, ``StorageRef``, ``TorchSymbol``,
``TorchFileInfo``), the dtypes and globals it knows, and the errors it raises."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ckpt_tools.problems import BAD_ARCHIVE, FormatError


MAX_PICKLE_BYTES = 256 * 1024 * 1024

#: Element size in bytes of every torch dtype (named as ``str(torch.<dtype>)`` minus "torch.").
DTYPE_SIZES: dict[str, int] = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "complex128": 16, "complex64": 8, "complex32": 4,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1,
    "uint64": 8, "uint32": 4, "uint16": 2, "uint8": 1, "bool": 1,
    "float8_e4m3fn": 1, "float8_e4m3fnuz": 1, "float8_e5m2": 1, "float8_e5m2fnuz": 1,
    "float8_e8m0fnu": 1, "float4_e2m1fn_x2": 1,
    "qint8": 1, "quint8": 1, "qint32": 4, "quint4x2": 1, "quint2x4": 1,
    "bits8": 1, "bits16": 2, "bits1x8": 1, "bits2x4": 1, "bits4x2": 1,
    **{f"int{n}": 1 for n in range(1, 8)},
    **{f"uint{n}": 1 for n in range(1, 8)},
}

_LEGACY_STORAGES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool", "ComplexDoubleStorage": "complex128",
    "ComplexFloatStorage": "complex64",
}
_QUANTIZED_STORAGES = {
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
}
#: Storage classes a persistent id may name → the dtype of the storage's elements.
STORAGE_DTYPES: dict[str, str] = {
    "torch.storage.UntypedStorage": "uint8",
    **{f"torch.{k}": v for k, v in (_LEGACY_STORAGES | _QUANTIZED_STORAGES).items()},
    **{f"torch.cuda.{k}": v for k, v in _LEGACY_STORAGES.items()},
}

_TENSOR_KINDS = ("Double", "Float", "Half", "BFloat16", "Long", "Int", "Short", "Char",
                 "Byte", "Bool")
_TENSOR_CLASSES = frozenset(
    {"torch.Tensor", "torch.nn.parameter.Parameter"}
    | {f"torch{m}.{k}Tensor" for m in ("", ".cuda") for k in _TENSOR_KINDS}
    | {f"torch{m}.sparse.{k}Tensor" for m in ("", ".cuda") for k in _TENSOR_KINDS if k != "Bool"}
)
_REBUILD_FUNCTIONS = frozenset(f"torch._utils._rebuild_{f}" for f in (
    "tensor", "tensor_v2", "tensor_v3", "parameter", "parameter_with_state", "qtensor",
    "sparse_tensor", "meta_tensor_no_storage", "nested_tensor", "wrapper_subclass",
    "device_tensor_from_numpy", "device_tensor_from_cpu_tensor"))

#: Exactly the globals torch 2.13's ``weights_only=True`` unpickler allows by default.
ALLOWED_GLOBALS: frozenset[str] = frozenset(
    {"collections.OrderedDict", "collections.Counter", "torch.serialization._get_layout",
     "torch.Size", "torch.device", "_codecs.encode", "builtins.bytearray", "builtins.set",
     "builtins.complex", "torch.storage.TypedStorage", "torch._tensor._rebuild_from_type_v2"}
    | {f"torch.{d}" for d in DTYPE_SIZES}
    | set(STORAGE_DTYPES) | _TENSOR_CLASSES | _REBUILD_FUNCTIONS
    | {f"torch.{q}" for q in ("per_tensor_affine", "per_tensor_symmetric", "per_channel_affine",
                              "per_channel_symmetric", "per_channel_affine_float_qparams")}
)

#: What the transformers Trainer adds to those when it loads ``rng_state*.pth`` on resume
#: (``torch.load(..., weights_only=True)`` inside ``trainer_pt_utils.safe_globals()``: numpy's
#: RNG state is an array), under numpy 1's and numpy 2's module names. Pass it as
#: ``check_pickle``: these globals are allowed and their calls evaluate to opaque values.
TRAINER_RNG_GLOBALS: frozenset[str] = frozenset(
    {f"numpy.{core}.multiarray._reconstruct" for core in ("core", "_core")}
    | {"numpy.ndarray", "numpy.dtype", "numpy.dtypes.UInt32DType"})

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_ZIP_LOCAL = b"PK\x03\x04"
#: A tensor may describe at most this many times the bytes of its storage (or 1 MiB, whichever
#: is more): a stride-0 view (``torch.zeros(1).expand(10**10, 32)``) is stored in 4 bytes and
#: would be materialised, by whoever copies it, as what it describes. Real checkpoints' views
#: (tied weights, ``position_ids.expand(1, -1)``) describe no more than their storage.
MAX_VIEW_EXPANSION = 16
@dataclass(frozen=True)
class TensorRef:
    """A tensor as the pickle describes it: a view of a storage (offset/stride in elements)."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_key: str
    storage_offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes the tensor holds as a dense tensor: what a copy of it writes."""
        return self.numel * DTYPE_SIZES[self.dtype]

    @property
    def storage_bytes_needed(self) -> int:
        """Bytes of its storage the tensor reaches, counted from the storage's start."""
        if self.numel == 0:
            return 0
        last = self.storage_offset + sum((d - 1) * s for d, s in zip(self.shape, self.stride))
        return (last + 1) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class StorageRef:
    """A bare storage (``torch.save(storage)``); tensors refer to storages by key."""

    key: str
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class TorchSymbol:
    """An allowlisted torch value that is not a tensor: a dtype, a device, a layout."""

    name: str
    args: tuple = ()


@dataclass(frozen=True)
class TorchFileInfo:
    """What a torch.save file holds, found without unpickling it.

    ``obj`` is the object tree (dict / list / tuple / set / str / int / float / complex /
    bool / None / bytes / ``TensorRef`` / ``TorchSymbol``), or None when the pickle was
    not checked. ``storages`` maps each referenced storage key to (dtype, bytes present).
    """

    format: str
    obj: object
    storages: dict[str, tuple[str, int]]
    record_prefix: str = ""


class _Short(Exception):
    """The pickle runs past the bytes at hand."""


class _Opaque:
    """Stands for anything built from an unchecked global (``check_pickle=False``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<opaque>"


def _bad(message: str) -> FormatError:
    return FormatError(BAD_ARCHIVE, message)


def _show(value) -> str:
    """A few characters naming a value from a hostile pickle, without walking it."""
    if isinstance(value, (str, bytes)):
        return repr(value[:60]) + ("..." if len(value) > 60 else "")
    if isinstance(value, (bool, float, complex, type(None))) or (
            type(value) is int and value.bit_length() <= 64):
        return repr(value)
    if isinstance(value, TorchSymbol):
        return value.name
    return f"a {type(value).__name__}"
