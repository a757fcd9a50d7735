"""``python -m balloonctl``: the same as the ``balloonctl`` command."""

import sys

from balloonctl.cli.main import main

sys.exit(main())
