"""``python -m bench``: see :func:`bench.run.main`."""
import sys

from .run import main

sys.exit(main())
