"""Script entry point that renders a training set: ``python -m spiral_rt.world.make_dataset OUT_DIR --num-videos N``.

Boundaries: a thin wrapper around ``dataset.main``.
"""

import sys

from .dataset import main

if __name__ == "__main__":
    sys.exit(main())
