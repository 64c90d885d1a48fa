"""Script entry point that (re)writes or checks the public goal set: ``python -m spiral_rt.world.make_goals [--check]``.

Boundaries: a thin wrapper around ``goals.main`` (kept separate so that running it does not import
the module it executes twice).
"""

import sys

from .goals import main

if __name__ == "__main__":
    sys.exit(main())
