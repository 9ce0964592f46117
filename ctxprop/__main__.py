"""``python -m ctxprop``."""

import sys

from ctxprop._devtools.cli import main

sys.exit(main())
