"""Configuration: dataclass schemas for every Hydra group (`schemas`), validation (`validate`),
composition (`compose`).

Every group (`conf/<group>/*.yaml`) is checked against a schema, so a typo or a bad value fails
at plan time with a message naming the key and what is allowed — before any job is submitted.
`from frontier import config` gives the whole API, as before the split.
"""
from .schemas import *  # noqa: F401,F403
from .validate import *  # noqa: F401,F403
from .validate import _validate_kv  # noqa: F401 - used by the cost CLI
from .compose import *  # noqa: F401,F403
from .compose import _hydra, _option_file  # noqa: F401
