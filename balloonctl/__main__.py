"""``python -m balloonctl``: the same as the ``balloonctl`` command."""

import sys

from balloonctl.cli import main

sys.exit(main())
