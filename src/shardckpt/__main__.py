"""``python -m shardckpt``: the command line, as the ``shardckpt`` script runs it."""

import sys

from .cli import main

sys.exit(main())
