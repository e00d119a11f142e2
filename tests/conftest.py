"""Shared pytest setup: make the repo root importable so tests can `from tests.fakes import ...`.

`python -m pytest` (the Makefile) already puts the working directory on sys.path; a bare
`pytest` run from elsewhere does not, hence the insertion.
"""

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
