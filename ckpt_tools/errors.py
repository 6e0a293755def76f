"""The kinds of failure the exit codes tell apart (README, "Exit status").

Every exception of the library that is the user's to fix derives from one class below, and
its ``exit_code`` is what the command line exits with (``cli/exits.py``). This module imports
nothing, so that the command line can tell them apart without importing the modules that
raise them (``--help`` stays cheap). Any other exception is a failure of ckpt-tools itself.
"""


class CkptToolsError(Exception):
    """A failure the user can act on: one line, naming the file and the cause."""

    exit_code = 1


class ProblemsError(CkptToolsError):
    """Something planned failed, and the run says so (exit 1)."""

    exit_code = 1


class UsageError(CkptToolsError):
    """A refusal: a bad path or option, a root that cannot be scanned, a ``--log`` or
    ``--lock`` that is not a regular file (exit 2)."""

    exit_code = 2


class TryAgain(CkptToolsError):
    """Another run holds what this one needs; nothing was done (exit 75, EX_TEMPFAIL)."""

    exit_code = 75


class Wording(str):
    """A message that names arguments of the Python API (``base_model``, ``rank``).

    Built from a template: a ``{field}`` given in ``values`` is data (a path, a module, a
    number; a ``Wording`` among them keeps its own arguments), every other field is an argument,
    and the text reads with its name: ``Wording("give {rank:N} or {energy:F}")`` is
    "give rank or energy". ``spelled(names)`` is the same message with each argument as a caller
    knows it, ``names`` mapping argument → its spelling; a field's format spec is the
    spelling's metavar, kept only there: the command line's ``{"rank": "--rank"}`` reads
    "give --rank N or --energy F". An exception carries a ``Wording`` as its message
    (``message_of``); being a ``str``, it goes wherever a message went before.
    """

    template: str
    values: dict

    def __new__(cls, template: str, /, **values):
        self = super().__new__(cls, _spell(template, values, {}, []))
        self.template, self.values = template, values
        return self

    def __getnewargs_ex__(self):
        return (self.template,), self.values

    @property
    def arguments(self) -> tuple[str, ...]:
        """The arguments it names, in order, those of the messages it holds included."""
        found: list[str] = []
        _spell(self.template, self.values, {}, found)
        return tuple(dict.fromkeys(found))

    def spelled(self, names) -> str:
        """The message with each argument it names spelled as ``names`` says (else its name)."""
        return _spell(self.template, self.values, names, [])


class _Argument:
    def __init__(self, spelling: str | None, name: str):
        self.spelling, self.name = spelling, name

    def __format__(self, metavar: str) -> str:
        if self.spelling is None:
            return self.name
        return f"{self.spelling} {metavar}" if metavar else self.spelling


class _Fields(dict):
    """The values of a template; a missing field is an argument (recorded in ``found``)."""

    def __init__(self, values: dict, names, found: list):
        super().__init__(values)
        self.names, self.found = names, found

    def __missing__(self, key: str) -> _Argument:
        self.found.append(key)
        return _Argument(self.names.get(key), key)


def _spell(template: str, values: dict, names, found: list) -> str:
    inner = {}
    for k, v in values.items():
        if isinstance(v, Wording):
            found.extend(v.arguments)
            v = v.spelled(names)
        inner[k] = v
    return template.format_map(_Fields(inner, names, found))


def message_of(exc: BaseException) -> str:
    """What ``exc`` was raised with: its ``Wording``, arguments and all, else its text."""
    if len(exc.args) == 1 and isinstance(exc.args[0], Wording):
        return exc.args[0]
    return str(exc)


def spelled(message: str, names) -> str:
    """``message`` with the arguments it names spelled as ``names`` says (plain text: itself)."""
    return message.spelled(names) if isinstance(message, Wording) else str(message)
