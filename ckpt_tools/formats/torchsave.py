"""Inspect ``torch.save`` files without unpickling them.

Two containers exist. The zip format (torch >= 1.6): one top-level folder holding
``data.pkl``, ``data/<key>`` storage records (always ZIP_STORED), ``version``,
``byteorder``... The legacy format (``_use_new_zipfile_serialization=False``): a
run of pickles (magic number, protocol version, sys_info, the object, the sorted list
of storage keys), then per storage an 8-byte little-endian element count and the raw
bytes.

The object pickle is evaluated by a small symbolic VM: nothing is imported and nothing
is called. It admits the globals that ``torch.load(weights_only=True)`` admits by
default (``torch/_weights_only_unpickler.py``) and models those a checkpoint uses:
dicts, lists, plain values and dense tensors, which become ``TensorRef`` records.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import math
import os
import struct
import zlib
from dataclasses import dataclass
from operator import itemgetter

from ckpt_tools.formats.safetensors_header import no_readahead, open_regular, pread_full
from ckpt_tools.problems import BAD_ARCHIVE, TRUNCATED, UNSAFE_PICKLE, FormatError
from ckpt_tools.read_cache import ArchiveMemo, BoundedMemo, ReadCache

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
_LEGACY_PROTOCOL = 1001
_LEGACY_MAGIC_PICKLE = b"\x80\x02\x8a\x0a" + _LEGACY_MAGIC.to_bytes(10, "little") + b"."
_ZIP_LOCAL = b"PK\x03\x04"
_ZIP_CENTRAL = b"PK\x01\x02"
_ZIP_END = b"PK\x05\x06"
_ZIP64_END = b"PK\x06\x06"
_ZIP64_LOCATOR = b"PK\x06\x07"
_MAX_CENTRAL_DIRECTORY = 8 * 1024 * 1024
_MAX_RECORD_WALK = 1_000_000
_MAX_DEFLATE_RATIO = 1100  # deflate cannot do better than ~1032:1
_FIRST_LEGACY_READ = 64 * 1024

# Bounds that keep the VM's memory in proportion to a sane pickle on hostile input.
_MAX_PUSHES = 10_000_000
_MAX_MEMO = 2_000_000
_MAX_MARKS = 1_000
_MAX_LONG_BYTES = 1024
_MAX_KEY_TUPLE = 64
_MAX_DEPTH = 256
_MAX_UNFOLDED = 10_000_000
_MAX_DIMS = 64
_MAX_EXTENT = 1 << 63  # sizes, strides and offsets are int64 in torch
_MAX_MEMO_INDEX = 1 << 32
# Hash flooding: distinct keys that share one hash value make every insertion into a dict or
# set walk all of them (150,000 int keys k * (2**61 - 1), all of hash 0, take minutes). Once a
# dict or set holds _WATCH_FROM keys, the hashes of its keys are counted, and a key that would
# be the (_MAX_SHARED_HASH + 1)-th distinct one of its hash value is refused: every insertion
# then costs at most that many comparisons. Distinct keys of one hash value are a handful at
# most in a real file (-1 and -2 share one).
_WATCH_FROM = 1024
_MAX_SHARED_HASH = 16
#: A tensor may describe at most this many times the bytes of its storage (or 1 MiB, whichever
#: is more): a stride-0 view (``torch.zeros(1).expand(10**10, 32)``) is stored in 4 bytes and
#: would be materialised, by whoever copies it, as what it describes. Real checkpoints' views
#: (tied weights, ``position_ids.expand(1, -1)``) describe no more than their storage.
MAX_VIEW_EXPANSION = 16
_VIEW_ALLOWANCE = 1 << 20


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


_OPAQUE = _Opaque()
_SCALAR_KEYS = (str, int, float, complex, bytes, type(None))


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


class _PickleVM:
    """Evaluates one pickle symbolically. Construct, then ``run(pos)``.

    ``strict``: globals outside ``ALLOWED_GLOBALS`` and allowlisted calls that are not
    modelled raise ``unsafe-pickle``; otherwise they evaluate to an opaque value. A frozenset
    of global names is strict with those globals allowed too: calls of them evaluate to
    opaque values (see ``TRAINER_RNG_GLOBALS``).
    ``pid_len``: 5 (zip) or 6 (legacy) for storage persistent ids, 0 to refuse them.
    """

    def __init__(self, data: bytes, *, strict: bool | frozenset[str] = True, pid_len: int = 0):
        self.data = data
        self.strict = bool(strict)
        self.opaque_globals = strict if isinstance(strict, frozenset) else frozenset()
        self.pid_len = pid_len
        self.storages: dict[str, StorageRef] = {}
        self.tensors: list[TensorRef] = []
        self.stack: list = []
        self.marks: list[int] = []
        self.memo: dict[int, object] = {}
        self.pushes = 0
        self.pos = 0
        # id of a large dict or set → (it, {hash value: distinct keys of that hash})
        self.watched: dict[int, tuple[object, dict[int, int]]] = {}

    # -- reading ----------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise _Short
        chunk = self.data[self.pos:end]
        self.pos = end
        return chunk

    def _unpack(self, fmt: str):
        size = struct.calcsize(fmt)
        (value,) = struct.unpack(fmt, self._take(size))
        return value

    def _line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        if end < 0:
            raise _Short
        line = self.data[self.pos:end]
        self.pos = end + 1
        return line

    def _sized(self, fmt: str) -> bytes:
        n = self._unpack(fmt)
        if n < 0:
            raise _bad(f"negative length {n}")
        return self._take(n)

    # -- stack ------------------------------------------------------------------------

    def push(self, value) -> None:
        self.pushes += 1
        if self.pushes > _MAX_PUSHES:
            raise _bad(f"pickle builds more than {_MAX_PUSHES} values")
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _bad("stack underflow")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise _bad("stack underflow")
        return self.stack[-1]

    def pop_mark(self) -> list:
        if not self.marks:
            raise _bad("no MARK on the stack")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def memo_put(self, index: int) -> None:
        if not 0 <= index < _MAX_MEMO_INDEX:
            raise _bad(f"memo index {_show(index)} out of range")
        if index not in self.memo and len(self.memo) >= _MAX_MEMO:
            raise _bad(f"memo holds more than {_MAX_MEMO} entries")
        self.memo[index] = self.top()

    def memo_get(self, index: int) -> None:
        if not 0 <= index < _MAX_MEMO_INDEX or index not in self.memo:
            raise _bad(f"memo index {index} was never stored")
        self.push(self.memo[index])

    # -- the loop ---------------------------------------------------------------------

    def run(self, pos: int = 0) -> tuple[object, int]:
        """Evaluate the pickle starting at ``pos``; return its value and the end offset."""
        self.pos = pos
        data = self.data
        while True:
            if self.pos >= len(data):
                raise _Short
            at = self.pos
            code = data[at]
            self.pos += 1
            handler = _OPCODES.get(code)
            if handler is None:
                raise _bad(f"unknown pickle opcode 0x{code:02x} at byte {at}")
            try:
                if handler(self):
                    return self.pop(), self.pos
            except (FormatError, _Short):
                raise
            except (ValueError, TypeError, OverflowError, struct.error) as exc:
                raise _bad(f"malformed pickle at byte {at}: {exc}") from None

    # -- symbolic values --------------------------------------------------------------

    def check_key(self, key) -> None:
        # Keys are hashed: allowing nested tuples would let a pickle make hashing exponential.
        if isinstance(key, _SCALAR_KEYS) or (not self.strict and isinstance(key, _Opaque)):
            return
        if isinstance(key, TorchSymbol) and all(isinstance(a, _SCALAR_KEYS) for a in key.args):
            return
        if (isinstance(key, tuple) and len(key) <= _MAX_KEY_TUPLE
                and all(isinstance(k, _SCALAR_KEYS) for k in key)):
            return
        raise _bad(f"unsupported dict key or set item of type {type(key).__name__}")

    def watch_key(self, target, key) -> None:
        """Refuse ``key`` where adding it to the large ``target`` would flood one hash value
        (see _MAX_SHARED_HASH); call it before adding, only once ``target`` is large."""
        entry = self.watched.get(id(target))
        if entry is None:
            counts: dict[int, int] = {}
            for k in target:  # fewer than _WATCH_FROM + a batch: the cost is bounded
                counts[hash(k)] = counts.get(hash(k), 0) + 1
            self.watched[id(target)] = (target, counts)
        else:
            counts = entry[1]
        if key in target:  # a walk of at most _MAX_SHARED_HASH keys of its hash
            return
        h = hash(key)
        seen = counts.get(h, 0)
        if seen >= _MAX_SHARED_HASH:
            raise _bad(f"more than {_MAX_SHARED_HASH} distinct keys of one dict or set share "
                       f"the hash value {h} (a hash-flooding pickle)")
        counts[h] = seen + 1

    def set_items(self, target, items: list) -> None:
        if len(items) % 2:
            raise _bad("SETITEMS with an odd number of items")
        if isinstance(target, _Opaque) and not self.strict:
            return
        if not isinstance(target, dict):
            raise _bad(f"SETITEM on a {type(target).__name__}, not a dict")
        for i in range(0, len(items), 2):
            key = items[i]
            self.check_key(key)
            if len(target) >= _WATCH_FROM:
                self.watch_key(target, key)
            target[key] = items[i + 1]

    def add_items(self, target, items: list) -> None:
        if isinstance(target, _Opaque) and not self.strict:
            return
        if not isinstance(target, set):
            raise _bad(f"ADDITEMS on a {type(target).__name__}, not a set")
        for item in items:
            self.check_key(item)
            if len(target) >= _WATCH_FROM:
                self.watch_key(target, item)
            target.add(item)

    def append_items(self, target, items: list) -> None:
        if isinstance(target, _Opaque) and not self.strict:
            return
        if not isinstance(target, list):
            raise _bad(f"APPEND on a {type(target).__name__}, not a list")
        target.extend(items)

    def find_global(self, module: str, name: str):
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in ALLOWED_GLOBALS or full in self.opaque_globals:
            return TorchSymbol(full)
        if self.strict:
            # The names come from the file: one with a newline or a control character is quoted,
            # so that the message stays one line that says what the file holds.
            shown = full[:120] if full[:120].isprintable() else repr(full[:120])
            raise FormatError(UNSAFE_PICKLE, f"pickle needs global {shown}, which is not a "
                                             "tensor, dict, list or plain value")
        return _OPAQUE

    def call(self, func, args):
        """What calling ``func(*args)`` would give, without calling anything."""
        if isinstance(func, _Opaque):
            if self.strict:  # only an allowed global may be called, as in torch's unpickler
                raise FormatError(UNSAFE_PICKLE, "pickle calls a value it built, not a global")
            return _OPAQUE
        if not isinstance(func, TorchSymbol):
            raise _bad(f"pickle calls a {type(func).__name__}, which is not callable")
        if not isinstance(args, tuple):
            raise _bad(f"arguments to {func.name} are a {type(args).__name__}, not a tuple")
        model = _CALLS.get(func.name)
        if model is None:
            if not self.strict or func.name in self.opaque_globals:
                return _OPAQUE
            raise FormatError(UNSAFE_PICKLE, f"pickle calls {func.name}, which ckpt-tools "
                                             "does not model (only dense tensors, dicts, "
                                             "lists and plain values)")
        try:
            return model(self, *args)
        except TypeError:  # wrong number of arguments for the model
            raise _bad(f"bad arguments to {func.name}: {len(args)} given") from None

    def build(self, inst, state) -> None:
        # BUILD sets an object's state; for the types modelled here the state carries
        # nothing a checkpoint reader needs (OrderedDict._metadata, Parameter attributes).
        if isinstance(inst, (TensorRef, _Opaque)) or not self.strict:
            return
        if isinstance(inst, dict) and (state is None or isinstance(state, (dict, tuple))):
            return
        raise _bad(f"BUILD on a {type(inst).__name__}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage")):
            raise _bad(f"persistent id {_show(pid)} is not a storage reference")
        if len(pid) != self.pid_len:
            raise _bad(f"storage reference has {len(pid)} fields, expected {self.pid_len}"
                       if self.pid_len else "storage reference outside the object pickle")
        storage_type, key, location, numel = pid[1:5]
        if len(pid) == 6 and pid[5] is not None:
            raise _bad("legacy storage views are not supported")
        if not (isinstance(storage_type, TorchSymbol) and storage_type.name in STORAGE_DTYPES):
            raise _bad(f"storage reference names {_show(storage_type)}, not a storage class")
        if not isinstance(key, str) or not isinstance(location, (str, bytes)):
            raise _bad("storage key and location must be strings")
        if type(numel) is not int or numel < 0:
            raise _bad(f"storage {_show(key)} has element count {_show(numel)}")
        if key not in self.storages:
            dtype = STORAGE_DTYPES[storage_type.name]
            self.storages[key] = StorageRef(key, dtype, numel * DTYPE_SIZES[dtype])
        # Like torch: a key seen again means the storage already loaded, with its first dtype.
        return self.storages[key]

    def rebuild_tensor(self, storage, offset, size, stride, dtype: str | None = None):
        if not isinstance(storage, StorageRef):
            raise _bad(f"tensor built on a {type(storage).__name__}, not a storage")
        if type(offset) is not int or offset < 0:
            raise _bad(f"tensor storage offset {_show(offset)} is not a non-negative integer")
        dims = _int_tuple(size, "size")
        strides = _int_tuple(stride, "stride")
        if len(dims) != len(strides):
            raise _bad(f"tensor size {dims} and stride {strides} differ in length")
        if offset >= _MAX_EXTENT:
            raise _bad(f"tensor storage offset {_show(offset)} is out of range")
        tensor = TensorRef(dtype or storage.dtype, dims, strides, storage.key, offset)
        self.tensors.append(tensor)
        return tensor


def _int_tuple(value, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(
            type(v) is int and v >= 0 for v in value):
        raise _bad(f"tensor {what} {_show(value)} is not a tuple of non-negative integers")
    if len(value) > _MAX_DIMS or any(v >= _MAX_EXTENT for v in value):
        raise _bad(f"tensor {what} {_show(value)} has more than {_MAX_DIMS} dimensions or a "
                   "value out of int64's range")
    return tuple(value)


def _dtype_of(symbol) -> str:
    if not (isinstance(symbol, TorchSymbol) and symbol.name.startswith("torch.")
            and symbol.name[6:] in DTYPE_SIZES):
        raise _bad(f"{_show(symbol)} is not a torch dtype")
    return symbol.name[6:]


def _as_tensor(value) -> TensorRef:
    if not isinstance(value, TensorRef):
        raise _bad(f"parameter data is a {type(value).__name__}, not a tensor")
    return value


def _make_dict(vm: _PickleVM, items=()) -> dict:
    pairs = items.items() if isinstance(items, dict) else items
    if not isinstance(pairs, (list, tuple, type({}.items()))):
        raise _bad(f"OrderedDict built from a {type(items).__name__}")
    result: dict = {}
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise _bad("OrderedDict built from something other than pairs")
        vm.set_items(result, list(pair))
    return result


def _make_set(vm: _PickleVM, items=()) -> set:
    if not isinstance(items, (list, tuple, set, frozenset)):
        raise _bad(f"set built from a {type(items).__name__}")
    result: set = set()
    vm.add_items(result, list(items))
    return result


def _make_bytes(vm: _PickleVM, source=b"", encoding=None) -> bytes:
    if isinstance(source, str) and encoding is not None:
        return _encode(vm, source, encoding)
    if isinstance(source, bytes) and encoding is None:
        return source
    if isinstance(source, list) and encoding is None and all(
            type(b) is int and 0 <= b < 256 for b in source):
        return bytes(source)
    raise _bad("bytearray built from unsupported arguments")


def _encode(vm: _PickleVM, text, encoding="utf-8", errors="strict") -> bytes:
    # Protocol 2 writes bytes as _codecs.encode(str, "latin1"); nothing else is needed.
    if not (isinstance(text, str) and encoding in ("latin1", "latin-1") and errors == "strict"):
        raise _bad("_codecs.encode with arguments other than (str, 'latin1')")
    try:
        return text.encode("latin-1")
    except UnicodeEncodeError:
        raise _bad("_codecs.encode of text outside latin-1") from None


def _make_complex(vm: _PickleVM, real=0.0, imag=0.0) -> complex:
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise _bad("complex built from non-numbers")
    return complex(real, imag)


def _make_size(vm: _PickleVM, dims=()) -> tuple:
    return _int_tuple(dims, "torch.Size")


def _make_device(vm: _PickleVM, *args) -> TorchSymbol:
    if not (1 <= len(args) <= 2 and isinstance(args[0], str)
            and all(type(a) is int for a in args[1:])):
        raise _bad("torch.device with arguments other than (type[, index])")
    return TorchSymbol("torch.device", args)


def _rebuild_v1(vm, storage, offset, size, stride):
    return vm.rebuild_tensor(storage, offset, size, stride)


def _rebuild_v2(vm, storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return vm.rebuild_tensor(storage, offset, size, stride)


def _rebuild_v3(vm, storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return vm.rebuild_tensor(storage, offset, size, stride, _dtype_of(dtype))


def _rebuild_parameter(vm, data, requires_grad=True, hooks=None, state=None):
    return _as_tensor(data)


def _rebuild_from_type(vm, func, new_type, args, state):
    if not (isinstance(func, TorchSymbol) and func.name in _REBUILD_FUNCTIONS):
        raise _bad(f"tensor rebuilt by {_show(func)}, not a rebuild function")
    if not (isinstance(new_type, TorchSymbol) and new_type.name in _TENSOR_CLASSES):
        raise _bad(f"tensor rebuilt as {_show(new_type)}, not a tensor class")
    return _as_tensor(vm.call(func, args))


_CALLS = {
    "collections.OrderedDict": _make_dict,
    "collections.Counter": _make_dict,
    "builtins.set": _make_set,
    "builtins.bytearray": _make_bytes,
    "builtins.complex": _make_complex,
    "_codecs.encode": _encode,
    "torch.Size": _make_size,
    "torch.device": _make_device,
    "torch._utils._rebuild_tensor": _rebuild_v1,
    "torch._utils._rebuild_tensor_v2": _rebuild_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type,
    "torch.nn.parameter.Parameter": _rebuild_parameter,
}


# -- opcodes: each handler returns True only for STOP ---------------------------------

def _decode_str(raw: bytes):
    # Python 2 str: text when it is UTF-8 (as torch.load's default encoding would read it).
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw


def _text_int(line: bytes):
    if line == b"00":
        return False
    if line == b"01":
        return True
    return int(line, 0)


def _quoted(line: bytes) -> bytes:
    if len(line) < 2 or line[0] != line[-1] or line[:1] not in (b"'", b'"'):
        raise _bad("STRING opcode argument is not quoted")
    return codecs.escape_decode(line[1:-1])[0]


def _long(vm: _PickleVM, fmt: str) -> int:
    n = vm._unpack(fmt)
    if not 0 <= n <= _MAX_LONG_BYTES:
        raise _bad(f"integer of {n} bytes")
    return int.from_bytes(vm._take(n), "little", signed=True)


def _tuple_n(vm: _PickleVM, n: int) -> None:
    items = [vm.pop() for _ in range(n)][::-1]
    vm.push(tuple(items))


def _stop(vm: _PickleVM) -> bool:
    return True


def _pop(vm: _PickleVM) -> None:
    if vm.marks and len(vm.stack) == vm.marks[-1]:
        vm.pop_mark()
    else:
        vm.pop()


def _pop_mark(vm: _PickleVM) -> None:
    vm.pop_mark()


def _mark(vm: _PickleVM) -> None:
    if len(vm.marks) >= _MAX_MARKS:
        raise _bad(f"more than {_MAX_MARKS} nested MARKs")
    vm.marks.append(len(vm.stack))


def _proto(vm: _PickleVM) -> None:
    version = vm._take(1)[0]
    if version > 5:
        raise _bad(f"unsupported pickle protocol {version}")


def _frame(vm: _PickleVM) -> None:
    size = vm._unpack("<Q")
    if vm.pos + size > len(vm.data):
        raise _Short


def _global(vm: _PickleVM) -> None:
    module = vm._line().decode("utf-8")
    name = vm._line().decode("utf-8")
    vm.push(vm.find_global(module, name))


def _stack_global(vm: _PickleVM) -> None:
    name, module = vm.pop(), vm.pop()
    if not (isinstance(module, str) and isinstance(name, str)):
        raise _bad("STACK_GLOBAL with non-string module or name")
    vm.push(vm.find_global(module, name))


def _ext(vm: _PickleVM, fmt: str) -> None:
    code = vm._unpack(fmt)
    raise FormatError(UNSAFE_PICKLE, f"pickle needs the global registered as extension "
                                     f"code {code} (copyreg), which is not allowed")


def _reduce(vm: _PickleVM) -> None:
    args = vm.pop()
    func = vm.pop()
    vm.push(vm.call(func, args))


def _newobj_ex(vm: _PickleVM) -> None:
    kwargs, args, cls = vm.pop(), vm.pop(), vm.pop()
    if kwargs != {} and not isinstance(cls, _Opaque):
        raise _bad("NEWOBJ_EX with keyword arguments")
    vm.push(vm.call(cls, args))


def _inst(vm: _PickleVM) -> None:
    module = vm._line().decode("utf-8")
    name = vm._line().decode("utf-8")
    cls = vm.find_global(module, name)
    vm.push(vm.call(cls, tuple(vm.pop_mark())))


def _obj(vm: _PickleVM) -> None:
    items = vm.pop_mark()
    if not items:
        raise _bad("OBJ without a class")
    vm.push(vm.call(items[0], tuple(items[1:])))


def _build(vm: _PickleVM) -> None:
    state = vm.pop()
    vm.build(vm.top(), state)


def _persid(vm: _PickleVM) -> None:
    vm.push(vm.persistent_load(vm._line().decode("ascii")))


def _binpersid(vm: _PickleVM) -> None:
    vm.push(vm.persistent_load(vm.pop()))


def _setitem(vm: _PickleVM) -> None:
    value = vm.pop()
    key = vm.pop()
    vm.set_items(vm.top(), [key, value])


def _setitems(vm: _PickleVM) -> None:
    items = vm.pop_mark()
    vm.set_items(vm.top(), items)


def _dict(vm: _PickleVM) -> None:
    items = vm.pop_mark()
    target: dict = {}
    vm.set_items(target, items)
    vm.push(target)


def _appends(vm: _PickleVM) -> None:
    items = vm.pop_mark()
    vm.append_items(vm.top(), items)


def _append(vm: _PickleVM) -> None:
    item = vm.pop()
    vm.append_items(vm.top(), [item])


def _additems(vm: _PickleVM) -> None:
    items = vm.pop_mark()
    vm.add_items(vm.top(), items)


def _frozenset(vm: _PickleVM) -> None:
    items: set = set()
    vm.add_items(items, vm.pop_mark())
    vm.push(frozenset(items))


def _next_buffer(vm: _PickleVM) -> None:
    raise _bad("pickle refers to an out-of-band buffer")


def _readonly_buffer(vm: _PickleVM) -> None:
    vm.top()


def _text_put(vm: _PickleVM) -> None:
    vm.memo_put(int(vm._line()))


def _text_get(vm: _PickleVM) -> None:
    vm.memo_get(int(vm._line()))


_OPCODES = {
    ord("("): _mark,
    ord("."): _stop,
    ord("0"): _pop,
    ord("1"): _pop_mark,
    ord("2"): lambda vm: vm.push(vm.top()),
    ord("F"): lambda vm: vm.push(float(vm._line())),
    ord("I"): lambda vm: vm.push(_text_int(vm._line())),
    ord("J"): lambda vm: vm.push(vm._unpack("<i")),
    ord("K"): lambda vm: vm.push(vm._take(1)[0]),
    ord("L"): lambda vm: vm.push(int(vm._line().rstrip(b"L"), 0)),
    ord("M"): lambda vm: vm.push(vm._unpack("<H")),
    ord("N"): lambda vm: vm.push(None),
    ord("P"): _persid,
    ord("Q"): _binpersid,
    ord("R"): _reduce,
    ord("S"): lambda vm: vm.push(_decode_str(_quoted(vm._line()))),
    ord("T"): lambda vm: vm.push(_decode_str(vm._sized("<i"))),
    ord("U"): lambda vm: vm.push(_decode_str(vm._sized("<B"))),
    ord("V"): lambda vm: vm.push(vm._line().decode("raw-unicode-escape")),
    ord("X"): lambda vm: vm.push(vm._sized("<I").decode("utf-8")),
    ord("a"): _append,
    ord("b"): _build,
    ord("c"): _global,
    ord("d"): _dict,
    ord("}"): lambda vm: vm.push({}),
    ord("e"): _appends,
    ord("g"): _text_get,
    ord("h"): lambda vm: vm.memo_get(vm._take(1)[0]),
    ord("i"): _inst,
    ord("j"): lambda vm: vm.memo_get(vm._unpack("<I")),
    ord("l"): lambda vm: vm.push(vm.pop_mark()),
    ord("]"): lambda vm: vm.push([]),
    ord("o"): _obj,
    ord("p"): _text_put,
    ord("q"): lambda vm: vm.memo_put(vm._take(1)[0]),
    ord("r"): lambda vm: vm.memo_put(vm._unpack("<I")),
    ord("s"): _setitem,
    ord("t"): lambda vm: vm.push(tuple(vm.pop_mark())),
    ord(")"): lambda vm: vm.push(()),
    ord("u"): _setitems,
    ord("G"): lambda vm: vm.push(vm._unpack(">d")),
    # protocol 2
    0x80: _proto,
    0x81: _reduce,  # NEWOBJ: cls(*args) is all the modelled classes need
    0x82: lambda vm: _ext(vm, "<B"),
    0x83: lambda vm: _ext(vm, "<H"),
    0x84: lambda vm: _ext(vm, "<i"),
    0x85: lambda vm: _tuple_n(vm, 1),
    0x86: lambda vm: _tuple_n(vm, 2),
    0x87: lambda vm: _tuple_n(vm, 3),
    0x88: lambda vm: vm.push(True),
    0x89: lambda vm: vm.push(False),
    0x8A: lambda vm: vm.push(_long(vm, "<B")),
    0x8B: lambda vm: vm.push(_long(vm, "<i")),
    # protocol 3
    ord("B"): lambda vm: vm.push(vm._sized("<I")),
    ord("C"): lambda vm: vm.push(vm._sized("<B")),
    # protocol 4
    0x8C: lambda vm: vm.push(vm._sized("<B").decode("utf-8")),
    0x8D: lambda vm: vm.push(vm._sized("<Q").decode("utf-8")),
    0x8E: lambda vm: vm.push(vm._sized("<Q")),
    0x8F: lambda vm: vm.push(set()),
    0x90: _additems,
    0x91: _frozenset,
    0x92: _newobj_ex,
    0x93: _stack_global,
    0x94: lambda vm: vm.memo_put(len(vm.memo)),
    0x95: _frame,
    # protocol 5
    0x96: lambda vm: vm.push(vm._sized("<Q")),
    0x97: _next_buffer,
    0x98: _readonly_buffer,
}


def _check_tree(obj) -> None:
    """Reject containers that contain themselves, nest deeper than ``_MAX_DEPTH`` or, by
    sharing subtrees, unfold to more than ``_MAX_UNFOLDED`` nodes for whoever walks them."""
    measured: dict[int, tuple[int, int]] = {}  # id → (depth, unfolded size)
    on_path: set[int] = set()
    work = [(obj, False)]
    while work:
        node, leaving = work.pop()
        if isinstance(node, dict):
            children = list(node.values())
        elif isinstance(node, (list, tuple)):
            children = node
        elif isinstance(node, TorchSymbol):
            children = node.args
        else:
            continue
        ident = id(node)
        if leaving:
            on_path.discard(ident)
            depth, size = 1, 1
            for child in children:
                child_depth, child_size = measured.get(id(child), (0, 1))
                depth, size = max(depth, child_depth + 1), size + child_size
            if depth > _MAX_DEPTH:
                raise _bad(f"object tree nests deeper than {_MAX_DEPTH} levels")
            if size > _MAX_UNFOLDED:
                raise _bad(f"object tree unfolds to more than {_MAX_UNFOLDED} nodes "
                           "through shared containers")
            measured[ident] = depth, size
            continue
        if ident in on_path:
            raise _bad("object tree contains a container that contains itself")
        if ident in measured:
            continue
        on_path.add(ident)
        work.append((node, True))
        work.extend((c, False) for c in children)


def _check_extents(tensors: list[TensorRef], storages: dict[str, StorageRef]) -> None:
    for tensor in tensors:
        have = storages[tensor.storage_key].nbytes
        if tensor.storage_bytes_needed > have:
            raise _bad(f"tensor of shape {list(tensor.shape)} at offset "
                       f"{tensor.storage_offset} needs {tensor.storage_bytes_needed} bytes of "
                       f"storage {_show(tensor.storage_key)}, which has {have}")
        if tensor.nbytes > max(MAX_VIEW_EXPANSION * have, _VIEW_ALLOWANCE):
            raise _bad(f"tensor of shape {list(tensor.shape)} and stride "
                       f"{list(tensor.stride)} describes {tensor.nbytes} bytes from "
                       f"{have} bytes of storage {_show(tensor.storage_key)} (more than "
                       f"{MAX_VIEW_EXPANSION} times its storage: an expanded view)")


def _run_pickle(data: bytes, pos: int, *, strict: bool, pid_len: int = 0):
    vm = _PickleVM(data, strict=strict, pid_len=pid_len)
    value, end = vm.run(pos)
    return vm, value, end


# -- reading the file -----------------------------------------------------------------

_SMALL_FILE = 1 << 20  # files up to this size are read whole, in one pread
_HEAD_READ = 16 * 1024  # larger files: the first read at offset 0 (data.pkl comes first)
_TAIL_READ = 16 * 1024  # larger files: the first read at the end (end records, most CDs)
_END_SEARCH = 22 + 0xFFFF + 20  # end record, the longest comment, the zip64 locator
_READ_AHEAD = 4096  # larger files: a read for a local header takes this much
_INFLATE_CHUNK = 1 << 20


class _File:
    """The bytes of one open file: all of them (small files), or the windows read so far.

    ``get(offset, n)`` answers like ``pread_full(fd, n, offset)`` (fewer bytes at the end
    of the file) from the whole file, a kept window or the last read, else reads.
    """

    __slots__ = ("fd", "size", "data", "windows", "recent")

    def __init__(self, fd: int, size: int, data: bytes | None = None):
        self.fd = fd
        self.size = size
        self.data = data
        self.windows: list[tuple[int, bytes]] = []
        self.recent: tuple[int, bytes] = (0, b"")

    def keep(self, offset: int, n: int) -> bytes:
        """Read ``n`` bytes at ``offset`` and keep them for later ``get`` calls."""
        window = pread_full(self.fd, n, offset)
        self.windows.append((offset, window))
        return window

    def tail(self, n: int) -> bytes:
        """The last ``n`` bytes of the file."""
        if self.data is not None:
            return self.data[len(self.data) - n:]
        return self.keep(self.size - n, n)

    def get(self, offset: int, n: int) -> bytes:
        if self.data is not None:
            return self.data[offset:offset + n]
        end = min(offset + n, self.size)
        for start, window in (*self.windows, self.recent):
            if start <= offset and end <= start + len(window):
                return window[offset - start:end - start]
        window = pread_full(self.fd, max(n, _READ_AHEAD), offset)
        self.recent = (offset, window)
        return window[:n]


# -- zip container --------------------------------------------------------------------
#
# Parsed here with ``struct`` from the bytes at hand rather than through ``zipfile``: the
# checks are those ``zipfile`` (CPython 3.11) makes on the way to reading data.pkl, plus
# the structural ones below, with the same outcomes; ``zipfile``'s leniencies that torch's
# own reader (miniz) refuses are refused (see ``_central_directory``).

# zipfile.structCentralDir ("<4s4B4HL2L5H2L", 46 bytes) less the fields nothing reads:
# signature, extract version, flags, method, CRC, compressed size, size, name / extra /
# comment lengths, local header offset.
_CD_RECORD = struct.Struct("<4s2xB1xHH4xIIIHHH8xI")
_U16_PAIR = struct.Struct("<HH")
_U16_TRIPLE = struct.Struct("<HHH")
_END_RECORD = struct.Struct("<HHHHIIH")  # after the signature
_STORED, _DEFLATED = 0, 8
_UTF8_NAME = 0x800
_MAX_EXTRACT_VERSION = 63  # zipfile.MAX_EXTRACT_VERSION


def _unreadable(detail: str) -> FormatError:
    return _bad(f"unreadable zip archive: {detail}")


def _find_end_record(tail: bytes) -> int | None:
    """Where in ``tail`` the end record is whose comment runs exactly to the end."""
    at = len(tail)
    while True:
        at = tail.rfind(_ZIP_END, 0, at)
        if at < 0:
            return None
        if len(tail) - at >= 22 and at + 22 + tail[at + 20] + (tail[at + 21] << 8) == len(tail):
            return at


def _find_central_directory(f: _File) -> tuple[int, int, int] | None:
    """(offset, size, end) of the central directory from the end records, or None."""
    size = f.size
    full = min(size, _END_SEARCH)
    tail_len = full if f.data is not None else min(full, _TAIL_READ)
    while True:
        tail = f.tail(tail_len)
        at = _find_end_record(tail)
        if at is not None or tail_len >= full:
            break
        tail_len = full  # an archive comment longer than the first read: look further
    if at is None:
        return None
    disk, cd_disk, _, entries, cd_size, cd_offset, comment_len = _END_RECORD.unpack_from(
        tail, at + 4)
    if disk or cd_disk:
        raise _bad("multi-disk zip archives are not supported")
    if comment_len and tail.find(_ZIP_END, at + 1) >= 0:
        # zipfile and miniz would take the last signature for the end record; no torch
        # archive has a comment, let alone one that makes the end record ambiguous.
        raise _bad("zip archive comment holds another end-of-central-directory signature")
    end = size - len(tail) + at
    # torch (miniz) always writes zip64 end records, large or not.
    if at >= 20 and tail.startswith(_ZIP64_LOCATOR, at - 20):
        locator_end = end
        zip64_disk, end, disks = struct.unpack_from("<IQI", tail, at - 16)
        record = f.get(end, 56) if end + 56 <= size else b""
        if record[:4] != _ZIP64_END:
            raise _bad("zip64 end-of-central-directory record is missing")
        if zip64_disk or disks > 1:
            raise _bad("multi-disk zip archives are not supported")
        if end + 56 + 20 != locator_end:
            raise _bad("zip64 end-of-central-directory record is not just before its locator")
        cd_size, cd_offset = struct.unpack_from("<QQ", record, 40)
    elif 0xFFFFFFFF in (cd_size, cd_offset) or entries == 0xFFFF:
        raise _bad("zip64 end record locator is missing")
    return cd_offset, cd_size, end


def _diagnose_no_end_record(f: _File) -> FormatError:
    """Walk the records of a zip that lacks its end record: was it cut short?"""
    size = f.size
    truncated = FormatError(TRUNCATED, f"zip archive is truncated: it ends at byte {size} "
                                       "without its end-of-central-directory record")
    pos = 0
    for _ in range(_MAX_RECORD_WALK):
        head = f.get(pos, 46)
        if len(head) < 4:
            return truncated
        if head[:4] == _ZIP_LOCAL:
            if len(head) < 30:
                return truncated
            (flags,) = struct.unpack_from("<H", head, 6)
            (csize,) = struct.unpack_from("<I", head, 18)
            name_len, extra_len = struct.unpack_from("<HH", head, 26)
            if csize == 0xFFFFFFFF:
                csize = _zip64_compressed_size(f.get(pos + 30 + name_len, extra_len))
            if flags & 0x08 or csize is None:
                break  # sizes follow the data (torch writes them so): the walk cannot go on
            pos += 30 + name_len + extra_len + csize
        elif head[:4] == _ZIP_CENTRAL:
            if len(head) < 46:
                return truncated
            pos += 46 + sum(struct.unpack_from("<HHH", head, 28))
        elif head[:4] == _ZIP64_END:
            if len(head) < 12:
                return truncated
            pos += 12 + struct.unpack_from("<Q", head, 4)[0]
        elif head[:4] == _ZIP64_LOCATOR:
            pos += 20
        elif head[:4] == _ZIP_END:
            if len(head) < 22 or pos + 22 + struct.unpack_from("<H", head, 20)[0] > size:
                return truncated
            return _bad("zip archive has bytes after its end-of-central-directory record")
        else:
            return _bad(f"zip archive has no end record and is corrupt at byte {pos}")
    return _bad("zip archive has no end-of-central-directory record: it was probably "
                "truncated (cut short while being written or copied)")


def _zip64_compressed_size(extra: bytes) -> int | None:
    at = 0
    while at + 4 <= len(extra):
        tag, length = struct.unpack_from("<HH", extra, at)
        if tag == 0x0001 and length >= 16 and at + 20 <= len(extra):
            return struct.unpack_from("<Q", extra, at + 12)[0]
        at += 4 + length
    return None


def _zip64_extra(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """Sizes and offset with the zip64 extra field applied, as ``ZipInfo._decodeExtra``."""
    at, n = 0, len(extra)
    while n - at >= 4:
        tag, length = _U16_PAIR.unpack_from(extra, at)
        if length + 4 > n - at:
            raise _unreadable(f"corrupt extra field {tag:04x} (size={length})")
        if tag == 0x0001:
            field, end = at + 4, at + 4 + length
            if usize in (0xFFFFFFFF, 0xFFFFFFFFFFFFFFFF):
                usize, field = _zip64_value(extra, field, end, "file size"), field + 8
            if csize == 0xFFFFFFFF:
                csize, field = _zip64_value(extra, field, end, "compressed size"), field + 8
            if offset == 0xFFFFFFFF:
                offset = _zip64_value(extra, field, end, "header offset")
        at += 4 + length
    return usize, csize, offset


def _zip64_value(extra: bytes, at: int, end: int, what: str) -> int:
    if at + 8 > end:
        raise _unreadable(f"corrupt zip64 extra field: {what} not found")
    return struct.unpack_from("<Q", extra, at)[0]


def _central_directory(cd: bytes) -> list[tuple]:
    """The records of a central directory: (offset, name, raw name, flags, method, CRC,
    compressed size, size) each, ``name`` as ``ZipInfo.filename`` has it.

    ``zipfile`` checks each record's signature and length; it silently cuts a record whose
    name, extra field or comment runs past the directory's end, which miniz (torch.load)
    refuses, and so does this.
    """
    entries = []
    pos, n = 0, len(cd)
    while pos < n:
        if pos + 46 > n:
            raise _unreadable("truncated central directory")
        (sig, version, flags, method, crc, csize, usize, name_len, extra_len, comment_len,
         offset) = _CD_RECORD.unpack_from(cd, pos)
        if sig != _ZIP_CENTRAL:
            raise _unreadable("bad magic number for central directory")
        name_end = pos + 46 + name_len
        next_pos = name_end + extra_len + comment_len
        if next_pos > n:
            raise _unreadable(f"central directory record {len(entries)} runs past the "
                              "directory's end")
        raw = cd[pos + 46:name_end]
        if raw.isascii():
            name = raw.decode("ascii")
        elif flags & _UTF8_NAME:
            try:
                name = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise _unreadable(str(exc)) from None
        else:
            name = raw.decode("cp437")
        if version > _MAX_EXTRACT_VERSION:  # zipfile raised NotImplementedError here
            raise _unreadable(f"zip file version {version / 10:.1f} is not supported")
        if extra_len:
            usize, csize, offset = _zip64_extra(cd[name_end:name_end + extra_len],
                                                usize, csize, offset)
        if "\0" in name:  # ZipInfo drops a name's tail from its first NUL
            name = name[:name.index("\0")]
        entries.append((offset, name, raw, flags, method, crc, csize, usize))
        pos = next_pos
    return entries


_OFFSET_OF = itemgetter(0)


def _check_records(f: _File, entries: list[tuple], cd_offset: int) -> None:
    """Every record's local header and data lie inside the file, in order, not overlapping."""
    whole = f.data
    data_end = 0
    for offset, name, raw, flags, method, _, csize, usize in sorted(entries, key=_OFFSET_OF):
        if flags & 0x01 or method != _STORED or csize != usize or offset < data_end:
            _check_record_fields(name, flags, method, csize, usize, offset, data_end)
        if whole is not None:
            buf, at = whole, offset
        else:
            buf, at = f.get(offset, 30 + len(raw)), 0
        if len(buf) - at < 30 or not buf.startswith(_ZIP_LOCAL, at):
            raise _bad(f"record {_show(name)}: no local header at byte {offset}")
        name_len, extra_len = _U16_PAIR.unpack_from(buf, at + 26)
        if name_len != len(raw) or not buf.startswith(raw, at + 30):
            local_name = f.get(offset + 30, name_len)
            if local_name != raw:  # zipfile compared the name decoded and encoded back
                raise _bad(f"record {_show(name)}: local header names {_show(local_name)}")
        data_end = offset + 30 + name_len + extra_len + csize
        if data_end > cd_offset:
            raise _bad(f"record {_show(name)} runs into the central directory")


def _check_record_fields(name: str, flags: int, method: int, csize: int, usize: int,
                         offset: int, data_end: int) -> None:
    """The checks of a record's directory fields, in order; returns for a sound one."""
    if flags & 0x01:
        raise _bad(f"record {_show(name)} is encrypted")
    if method != _STORED and method != _DEFLATED:
        raise _bad(f"record {_show(name)} uses compression method {method}, "
                   "which torch cannot read")
    if method == _STORED and csize != usize:
        raise _bad(f"stored record {_show(name)} declares {usize} bytes but "
                   f"occupies {csize}")
    if method != _STORED and usize > _MAX_DEFLATE_RATIO * max(csize, 1):
        raise _bad(f"record {_show(name)} claims {usize} bytes from "
                   f"{csize} compressed bytes (zip bomb)")
    if offset < data_end:
        raise _bad(f"record {_show(name)} overlaps the record before it")


def _read_record(f: _File, entry: tuple) -> bytes:
    """The bytes of a record ``_check_records`` passed, with ``ZipFile.open``'s checks."""
    offset, name, raw, flags, method, crc, csize, usize = entry
    what = name.rsplit("/", 1)[-1]
    if flags & 0x20:
        raise _bad(f"{what} is unreadable: compressed patched data (flag bit 5)")
    if flags & 0x40:
        raise _bad(f"{what} is unreadable: strong encryption (flag bit 6)")
    head = f.get(offset, 30)
    (local_flags,) = struct.unpack_from("<H", head, 6)
    name_len, extra_len = _U16_PAIR.unpack_from(head, 26)
    if (local_flags ^ flags) & _UTF8_NAME and not raw.isascii():
        raise _bad(f"{what} is unreadable: its name is encoded differently in the directory "
                   "and in its local header")
    start = offset + 30 + name_len + extra_len
    if method == _STORED:
        data = f.get(start, csize)
        if len(data) != csize:  # only a file cut short since its records were checked
            raise _bad(f"{what} is unreadable: the file ends inside it")
    else:
        data = _inflate(f, start, csize, usize, what)
    if zlib.crc32(data) != crc:
        raise _bad(f"{what} is unreadable: bad CRC-32 for file {_show(name)}")
    return data


def _inflate(f: _File, start: int, csize: int, usize: int, what: str) -> bytes:
    """At most ``usize`` bytes inflated from the ``csize`` bytes at ``start``, read and
    inflated a chunk at a time: never more input or output than that at hand."""
    decompressor = zlib.decompressobj(-15)
    parts = []
    want, pos, end = usize, start, start + csize
    try:
        while want > 0 and pos < end:
            chunk = f.get(pos, min(end - pos, _INFLATE_CHUNK))
            if not chunk:
                raise _bad(f"{what} is unreadable: the file ends inside it")
            pos += len(chunk)
            out = decompressor.decompress(chunk, want)
            parts.append(out)
            want -= len(out)
            if decompressor.eof:
                break
        if want > 0 and not decompressor.eof:
            parts.append(decompressor.flush()[:want])
    except zlib.error as exc:
        raise _bad(f"{what} is unreadable: {exc}") from None
    return b"".join(parts)


def _inspect_zip(f: _File, check_pickle: bool, max_pickle_bytes: int,
                 cache: ReadCache | None) -> TorchFileInfo:
    info, _, _ = _read_zip(f, check_pickle, max_pickle_bytes, cache)
    return info if cache is None else _handed_out(info)


def _handed_out(info: TorchFileInfo) -> TorchFileInfo:
    """A copy of ``info`` whose containers (the object tree, the storages) are the caller's."""
    return TorchFileInfo(info.format, None if info.obj is None else _fresh(info.obj),
                         dict(info.storages), info.record_prefix)


def _read_zip(f: _File, check_pickle: bool, max_pickle_bytes: int, cache: ReadCache | None):
    """(info, central directory entries, its offset) of a sound zip archive; with a
    ``cache``, ``info.obj`` is the memoised tree, shared: never hand it out (``_handed_out``)."""
    found = _find_central_directory(f)
    if found is None:
        raise _diagnose_no_end_record(f)
    cd_offset, cd_size, cd_end = found
    if cd_offset + cd_size != cd_end:
        raise _bad("central directory is not where the end record says it is")
    if cd_size > _MAX_CENTRAL_DIRECTORY:
        raise _bad(f"central directory of {cd_size} bytes is too large")
    entries = _central_directory(f.get(cd_offset, cd_size))
    if not entries:
        raise _bad("zip archive is empty")
    records = {entry[1]: entry for entry in entries}
    if len(records) != len(entries):
        raise _bad("zip archive holds two records of the same name")
    first = entries[0][1]
    prefix = first.split("/", 1)[0]
    folder = prefix + "/"
    if "/" not in first:
        raise _bad("records are not all in one top-level folder")
    for name in records:
        if not name.startswith(folder):
            raise _bad("records are not all in one top-level folder")
    _check_records(f, entries, cd_offset)
    pkl = records.get(f"{prefix}/data.pkl")
    if pkl is None:
        raise _bad(f"no {_show(prefix + '/data.pkl')} record")
    if pkl[7] > max_pickle_bytes:
        raise _bad(f"data.pkl is {pkl[7]} bytes, over the {max_pickle_bytes}-byte limit")
    data = _read_record(f, pkl)

    obj, refs, late_error = _evaluate_data_pkl(data, check_pickle,
                                               None if cache is None else cache.pickles)
    storages: dict[str, tuple[str, int]] = {}
    for key, storage in refs.items():
        entry = records.get(f"{folder}data/{key}")
        if entry is None:
            raise _bad(f"storage record {_show('data/' + key)} is missing")
        if entry[4] != _STORED:
            raise _bad(f"storage record {_show('data/' + key)} is compressed (torch.save stores "
                       "storages uncompressed; mmap loading needs that)")
        if entry[7] < storage.nbytes:
            raise _bad(f"storage record {_show('data/' + key)} holds {entry[7]} bytes, "
                       f"the pickle needs {storage.nbytes}")
        storages[key] = (storage.dtype, entry[7])
    if late_error is not None:
        raise FormatError(*late_error)
    return TorchFileInfo("zip", obj if check_pickle else None, storages, prefix), entries, cd_offset


# -- memo of data.pkl evaluations ---------------------------------------------------------

_MEMO_MAX_PICKLE = 1 << 20  # larger pickles are evaluated afresh every time
_MEMO_VALUE_WEIGHT = 128  # bytes counted per value the VM pushed, for the memo's budget
# ``ReadCache.pickles``: (pickle bytes, strict, pid_len) → evaluation: pid_len 5 for a zip
# archive's data.pkl, 6 for the run of pickles that opens a legacy file.
# ``ReadCache.legacy_runs``: lengths of the pickle runs of the legacy files seen last: where
# to cut a legacy file's bytes to look its run up in ``pickles`` before evaluating it.


def _evaluate_data_pkl(data: bytes, strict: bool, memo: BoundedMemo | None):
    """(obj, storages by key, late error) of a zip archive's data.pkl; memoised.

    Raises the ``FormatError`` for a pickle the VM refuses. ``late_error`` is the
    (code, message) of a failed tensor-extent or object-tree check, which the caller
    raises after checking the storage records, as a fresh read would order them.
    ``memo``: a ``ReadCache.pickles``, or None to evaluate afresh.

    The evaluation and those checks are a pure function of the pickle's bytes and
    ``strict``, so the checkpoints of a run, whose router.pt / skill_library.pt /
    adapter pickles are byte-identical (tensor values live in the storage records, not
    in data.pkl), share one evaluation. The memoised ``obj`` tree is never handed out:
    ``_fresh`` gives every caller its own copy of the containers.
    """
    key = (data, strict, 5) if memo is not None and len(data) <= _MEMO_MAX_PICKLE else None
    found = memo.get(key) if key is not None else None
    if found is None:
        found, weight = _evaluate_afresh(data, strict)
        if key is not None:
            memo.put(key, found, weight)
    early_error, obj, refs, late_error = found
    if early_error is not None:
        raise FormatError(*early_error)
    return obj, refs, late_error


def _evaluate_afresh(data: bytes, strict: bool) -> tuple[tuple, int]:
    try:
        vm, obj, _ = _run_pickle(data, 0, strict=strict, pid_len=5)
    except _Short:
        return ((BAD_ARCHIVE, "data.pkl ends before its STOP opcode"), None, None, None), len(data)
    except FormatError as exc:
        return ((exc.code, exc.message), None, None, None), len(data)
    late_error = _late_checks(vm, obj, strict)
    keep = obj if strict and late_error is None else None
    return (None, keep, vm.storages, late_error), len(data) + _MEMO_VALUE_WEIGHT * vm.pushes


def _late_checks(vm: _PickleVM, obj, strict: bool) -> tuple[str, str] | None:
    """(code, message) where the tensors overrun their storages' declared sizes or the
    tree (when judged) is cyclic, too deep or too large unfolded; None when sound."""
    try:
        _check_extents(vm.tensors, vm.storages)
        if strict:
            _check_tree(obj)
    except FormatError as exc:
        return exc.code, exc.message
    return None


_ATOMS = frozenset({str, int, float, complex, bool, bytes, type(None), frozenset,
                    TensorRef, StorageRef, TorchSymbol})


def _fresh(node, memo: dict | None = None):
    """A copy of an object tree's mutable containers (dicts, lists, sets, and tuples that
    hold them), sharing what the tree shares; immutable leaves are the same objects.
    Linear in the distinct containers: ``_check_tree`` bounded the depth."""
    kind = type(node)
    if kind in _ATOMS:
        return node
    if memo is None:
        memo = {}
    ident = id(node)
    done = memo.get(ident)
    if done is not None:
        return done
    atoms = _ATOMS
    if kind is dict:
        copy: object = {}
        memo[ident] = copy
        for key, value in node.items():
            copy[key] = value if type(value) in atoms else _fresh(value, memo)
    elif kind is list:
        copy = []
        memo[ident] = copy
        for value in node:
            copy.append(value if type(value) in atoms else _fresh(value, memo))
    elif kind is tuple:
        items = [value if type(value) in atoms else _fresh(value, memo) for value in node]
        copy = node if all(a is b for a, b in zip(items, node)) else tuple(items)
        memo[ident] = copy
    elif kind is set:
        copy = set(node)
        memo[ident] = copy
    else:
        return node
    return copy


# -- memo of whole small archives -------------------------------------------------------
#
# The torch.save files of a run's checkpoints (router, skill library) differ only where the
# zip reader never looks: the bytes of every record but data.pkl (tensor values, the
# serialization id), the data descriptors and padding after each record, and the directory's
# CRC-32 fields of those records (only data.pkl's CRC is checked). Once an archive read whole
# has passed every check, where those ranges lie is known from its directory; a later file
# of the same size that is byte for byte the same outside them is the same input to every
# check, so it gets the same result. Every byte outside the ranges is compared (it is part
# of the key): a difference anywhere the reader looks means a full read.

def _unread_ranges(data: bytes, entries: list[tuple], cd_offset: int,
                   pkl_name: str) -> list[tuple[int, int]]:
    """Byte ranges of a sound archive (read whole) that no check depends on. (The local
    headers' CRC-32 fields are never read either, but torch writes zeros there, the sizes
    following the data: kept, they cost nothing in hits and save a slice each.)"""
    cut = []
    ordered = sorted(entries, key=_OFFSET_OF)
    for i, (offset, name, _, _, _, _, csize, _) in enumerate(ordered):
        following = ordered[i + 1][0] if i + 1 < len(ordered) else cd_offset
        name_len, extra_len = _U16_PAIR.unpack_from(data, offset + 26)
        start = offset + 30 + name_len + extra_len
        cut.append((start + csize if name == pkl_name else start, following))
    pos = cd_offset
    for _, name, _, _, _, _, _, _ in entries:  # in directory order
        if name != pkl_name:
            cut.append((pos + 16, pos + 20))  # the directory's CRC-32 of a record never read
        pos += 46 + sum(_U16_TRIPLE.unpack_from(data, pos + 28))
    return cut


class ArchiveRanges:
    """The byte ranges that every check depends on (all but the unread ranges cut), in
    archives of one size and structure; ``kept(data)`` is the memo key's part from a file."""

    __slots__ = ("ident", "cut", "_pick", "last")

    def __init__(self, ident: int, size: int, cut: tuple[tuple[int, int], ...]):
        self.ident = ident
        self.cut = cut
        keep = []
        at = 0
        for start, end in sorted(cut):
            if start > at:
                keep.append(slice(at, start))
            at = max(at, end)
        if at < size:
            keep.append(slice(at, size))
        keep.append(slice(0, 0))  # so that itemgetter always gives a tuple
        self._pick = itemgetter(*keep)
        # (check_pickle, max bytes, kept bytes, info) of the archive met last: compared
        # directly, the same file again costs no hashing of its bytes
        self.last: tuple | None = None

    def kept(self, data: bytes) -> bytes:
        """The bytes of ``data`` outside the ranges cut."""
        return b"".join(self._pick(data))


def _archive_from_memo(memo: ArchiveMemo, data: bytes, check_pickle: bool,
                       max_pickle_bytes: int):
    for ranges in memo.ranges.get(len(data), ()):
        kept = ranges.kept(data)
        last = ranges.last
        if (last is not None and last[2] == kept and last[0] == check_pickle
                and last[1] == max_pickle_bytes):
            return last[3]
        hit = memo.results.get((ranges.ident, check_pickle, max_pickle_bytes, kept))
        if hit is not None:
            ranges.last = (check_pickle, max_pickle_bytes, kept, hit)
            return hit
    return None


def _remember_archive(memo: ArchiveMemo, data: bytes, info: TorchFileInfo, entries: list[tuple],
                      cd_offset: int, check_pickle: bool, max_pickle_bytes: int) -> None:
    cut = tuple(_unread_ranges(data, entries, cd_offset, f"{info.record_prefix}/data.pkl"))
    size = len(data)
    known = memo.ranges.get(size)
    if known is None:
        if len(memo.ranges) >= memo.MAX_ARCHIVES:
            memo.clear()
        known = memo.ranges[size] = []
    for ranges in known:
        if ranges.cut == cut:
            break
    else:
        ranges = ArchiveRanges(memo.new_ident(), size, cut)
        known.insert(0, ranges)
        del known[memo.MAX_RANGES_PER_SIZE:]
    kept = ranges.kept(data)
    if len(memo.results) >= memo.MAX_ARCHIVES or memo.weight > memo.MAX_BYTES:
        memo.results.clear()
        memo.weight = 0
    memo.results[(ranges.ident, check_pickle, max_pickle_bytes, kept)] = info
    memo.weight += 2 * size
    ranges.last = (check_pickle, max_pickle_bytes, kept, info)


# -- legacy container -----------------------------------------------------------------

def _parse_legacy_pickles(data: bytes, check_pickle: bool):
    not_torch = _bad("neither a zip archive nor a legacy torch.save file")
    try:
        _, magic, pos = _run_pickle(data, 0, strict=True)
    except _Short:
        if _LEGACY_MAGIC_PICKLE.startswith(data):
            raise FormatError(TRUNCATED, "file ends inside the legacy magic number") from None
        raise not_torch from None
    except FormatError as exc:
        if exc.code == UNSAFE_PICKLE:  # a plain pickle that torch.load would run
            raise
        raise not_torch from None
    if type(magic) is not int or magic != _LEGACY_MAGIC:
        raise _bad("neither a zip archive nor a legacy torch.save file (no magic number)")
    _, protocol, pos = _run_pickle(data, pos, strict=True)
    if protocol != _LEGACY_PROTOCOL:
        raise _bad(f"legacy torch.save protocol {_show(protocol)}, expected {_LEGACY_PROTOCOL}")
    _, sys_info, pos = _run_pickle(data, pos, strict=True)
    if not isinstance(sys_info, dict):
        raise _bad("legacy torch.save sys_info is not a dict")
    vm, obj, pos = _run_pickle(data, pos, strict=check_pickle, pid_len=6)
    _, keys, pos = _run_pickle(data, pos, strict=True)
    if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
        raise _bad("legacy storage key list is not a list of strings")
    return vm, obj, keys, pos


def _legacy_pickles(data: bytes, check_pickle: bool, cache: ReadCache | None):
    """``_parse_legacy_pickles`` and the late checks, memoised: (obj, storages by key,
    storage keys, end of the pickles, late error). Raises ``_Short`` and errors as it does.

    A legacy file's pickles come first and end at the key list's STOP, so the file's
    bytes up to there are the key; where that is is known only once they are evaluated,
    so the run lengths seen last are tried. The VM reads nothing past a STOP, so a run
    that evaluated whole from those bytes evaluates the same from any longer prefix.
    """
    if cache is not None:
        for length in cache.legacy_runs.recent():
            if length <= len(data):
                found = cache.pickles.get((data[:length], check_pickle, 6))
                if found is not None:
                    cache.legacy_runs.get(length)
                    return found
    vm, obj, keys, pos = _parse_legacy_pickles(data, check_pickle)
    late_error = _late_checks(vm, obj, check_pickle)
    found = (obj if check_pickle and late_error is None else None, vm.storages, keys, pos,
             late_error)
    if cache is not None and pos <= _MEMO_MAX_PICKLE:
        cache.pickles.put((data[:pos], check_pickle, 6), found,
                          pos + _MEMO_VALUE_WEIGHT * vm.pushes)
        cache.legacy_runs.put(pos, True, 1)
    return found


def _inspect_legacy(f: _File, check_pickle: bool, max_pickle_bytes: int,
                    cache: ReadCache | None) -> TorchFileInfo:
    size = f.size
    want = min(_FIRST_LEGACY_READ, max_pickle_bytes)
    while True:
        data = f.get(0, min(size, want))
        try:
            obj, refs, keys, pos, late_error = _legacy_pickles(data, check_pickle, cache)
            break
        except _Short:
            if len(data) >= size:
                raise FormatError(TRUNCATED, f"file ends at byte {size} inside its "
                                             "pickle data") from None
            if want >= max_pickle_bytes:
                raise _bad(f"pickle data exceeds the {max_pickle_bytes}-byte limit") from None
            want = min(want * 8, max_pickle_bytes)

    if len(set(keys)) != len(keys):
        raise _bad("legacy storage key list repeats a key")
    if set(keys) != set(refs):
        missing = sorted(set(refs) - set(keys)) or sorted(set(keys) - set(refs))
        raise _bad(f"storage {_show(missing[0])} is referenced but not stored, or stored but "
                   "not referenced")
    storages: dict[str, tuple[str, int]] = {}
    for key in keys:
        storage = refs[key]
        head = f.get(pos, 8)
        if len(head) < 8:
            raise FormatError(TRUNCATED, f"file ends at byte {size} before storage {_show(key)}")
        (count,) = struct.unpack("<q", head)
        nbytes = count * DTYPE_SIZES[storage.dtype]
        if count < 0 or nbytes != storage.nbytes:
            raise _bad(f"storage {_show(key)} holds {count} elements, the pickle declared "
                       f"{storage.nbytes // DTYPE_SIZES[storage.dtype]}")
        pos += 8 + nbytes
        if pos > size:
            raise FormatError(TRUNCATED, f"storage {_show(key)} ends at byte {pos} but the file "
                                         f"has {size} bytes")
        storages[key] = (storage.dtype, nbytes)
    if late_error is not None:
        raise FormatError(*late_error)
    if check_pickle and cache is not None:
        obj = _fresh(obj)  # the memoised tree is shared: the caller gets its own containers
    return TorchFileInfo("legacy", obj if check_pickle else None, storages)


def inspect_torch_file(path: str | os.PathLike, *,
                       check_pickle: bool | frozenset[str] = True,
                       max_pickle_bytes: int = MAX_PICKLE_BYTES, shared: bool = False,
                       file_size: int | None = None,
                       cache: ReadCache | None = None) -> TorchFileInfo:
    """Check a ``torch.save`` file's container and pickle without unpickling it.

    Reads the zip directory and the pickle, never the tensor data: a file of up to
    1 MiB in one ``pread``, a larger one by its first and last 16 KiB and what else the
    directory points at. With ``check_pickle`` a global that
    ``torch.load(weights_only=True)`` would refuse, or an allowlisted call this reader
    does not model, raises ``FormatError`` ``unsafe-pickle``; without it (for files such
    as ``training_args.bin`` that are never loaded) globals are not judged and ``obj`` is
    None. Other damage raises ``bad-archive`` or ``truncated``; errors from the OS
    propagate as ``OSError``. With a ``cache`` (``ReadCache``), evaluations of pickles and
    whole small archives are memoised in it (see above); each call gets its own ``obj`` tree,
    unless ``shared``: then the result may be the very object other calls with that cache
    get, never to be mutated. Without one, nothing is memoised and every result is new.
    ``file_size``: the size of a regular file as the caller's own ``lstat`` saw it (see
    ``safetensors_header.open_regular``). ``check_pickle`` may be a frozenset of global
    names (``TRAINER_RNG_GLOBALS``): then it is True with those globals allowed too.
    """
    fd, size = open_regular(path, file_size)
    try:
        if size == 0:
            raise FormatError(TRUNCATED, "empty file")
        if size <= _SMALL_FILE:
            data = pread_full(fd, size, 0)
            f = _File(fd, len(data), data)  # a file cut short since fstat: what is there
            if data[:4] == _ZIP_LOCAL:
                if cache is None:
                    return _read_zip(f, check_pickle, max_pickle_bytes, None)[0]
                memo = cache.archives
                info = _archive_from_memo(memo, data, check_pickle, max_pickle_bytes)
                if info is None:
                    info, entries, cd_offset = _read_zip(f, check_pickle, max_pickle_bytes, cache)
                    _remember_archive(memo, data, info, entries, cd_offset, check_pickle,
                                      max_pickle_bytes)
                return info if shared else _handed_out(info)
        else:
            no_readahead(fd)
            f = _File(fd, size)
            data = f.keep(0, _HEAD_READ)
        if data[:4] == _ZIP_LOCAL:
            return _inspect_zip(f, check_pickle, max_pickle_bytes, cache)
        return _inspect_legacy(f, check_pickle, max_pickle_bytes, cache)
    finally:
        os.close(fd)


def flatten_tensors(obj, *, max_nodes: int = 10_000_000) -> dict[str, TensorRef]:
    """Map dotted names to the tensors of a state-dict-like tree.

    Nested dict keys and list/tuple indices are joined with '.', in the tree's order:
    ``{"gate_state_dict": {"weight": t}}`` gives ``{"gate_state_dict.weight": t}``.
    Raises ``FormatError`` (``bad-archive``) past ``max_nodes`` visited nodes, which
    bounds the work on trees that share a subtree many times.
    """
    out: dict[str, TensorRef] = {}
    work: list[tuple[str, object]] = [("", obj)]
    visited = 0
    while work:
        name, node = work.pop()
        visited += 1
        if visited > max_nodes:
            raise _bad(f"object tree has more than {max_nodes} nodes")
        if isinstance(node, TensorRef):
            out[name] = node
            continue
        if isinstance(node, dict):
            items = list(node.items())
        elif isinstance(node, (list, tuple)):
            items = list(enumerate(node))
        else:
            continue
        work.extend((f"{name}.{key}" if name else str(key), value)
                    for key, value in reversed(items))
    return out
