"""The symbolic pickle VM: evaluates a torch.save pickle's opcodes without importing or
calling anything, admitting what ``torch.load(weights_only=True)`` admits, within bounds."""

from __future__ import annotations

import _compat_pickle
import codecs
import struct

from ckpt_tools.problems import UNSAFE_PICKLE, FormatError
from .model import (ALLOWED_GLOBALS, DTYPE_SIZES, MAX_VIEW_EXPANSION, STORAGE_DTYPES, StorageRef,
                    TensorRef, TorchSymbol, _Opaque, _REBUILD_FUNCTIONS, _Short, _TENSOR_CLASSES,
                    _bad, _show)


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
_VIEW_ALLOWANCE = 1 << 20


_OPAQUE = _Opaque()
_SCALAR_KEYS = (str, int, float, complex, bytes, type(None))


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
