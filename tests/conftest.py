"""Shared pytest setup: make the repo root importable so tests can `from tests.fakes import ...`,
and let idle OpenMP threads sleep (OMP_WAIT_POLICY=PASSIVE, as rlx itself does).

`python -m pytest` (the Makefile) already puts the working directory on sys.path; a bare
`pytest` run from elsewhere does not, hence the insertion.
"""

import os
import sys
from pathlib import Path

# Before anything loads torch (see rlx/__init__.py): idle OpenMP threads sleep instead of spinning.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
