"""``python -m fastbd``: the ``fastbd`` command."""

import sys

from fastbd.cli import main

sys.exit(main())
