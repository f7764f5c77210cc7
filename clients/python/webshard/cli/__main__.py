"""``python -m webshard.cli``: the same as the ``webshard`` command."""

import sys

from webshard.cli import main

sys.exit(main())
