"""The former home of migrate, kept because the README named ``converter.plan_migrate`` and
``converter.execute_migrate``: the public names of ``ckpt_tools.migrate``, unchanged."""

from .migrate import *  # noqa: F401,F403
from .migrate import __all__  # noqa: F401
