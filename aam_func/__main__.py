"""``python -m aam_func train | generate | eval`` (the same as the ``aam-func`` command)."""

import sys

from .cli import main

sys.exit(main())
