"""`python -m mathlora_daemon` is the same as the `mathlora-daemon` console script."""

import sys

from mathlora_daemon.cli import main

sys.exit(main())
