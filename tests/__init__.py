"""
The trial suite.  Run it with ``python -m twisted.trial tests``.

As a safety net, importing this package points ``HOME``, ``XDG_*`` and
``CLAUDECTL_HOME`` at a throw-away directory, so that no test can read or
write the real ``~/.claudectl`` or ``~/.config`` even by mistake.
"""

import atexit
import os
import shutil
import tempfile

_SAFE_HOME = tempfile.mkdtemp(prefix="claudectl-tests-home-")
atexit.register(shutil.rmtree, _SAFE_HOME, True)
os.environ["HOME"] = _SAFE_HOME
os.environ["CLAUDECTL_HOME"] = _SAFE_HOME
for _var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
    os.environ[_var] = os.path.join(_SAFE_HOME, _var.lower())

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "ci", deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow]
    )
    settings.load_profile("ci")
except ImportError:  # pragma: no cover - hypothesis is a dev dependency
    pass
