"""`python -m daemon` is the same as the `mathlora-daemon` console script."""

import sys

from daemon.cli import main

sys.exit(main())
