"""Entry point for `python -m operators`."""

import sys

from operators.cli import main

sys.exit(main())
