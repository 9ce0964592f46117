"""``python -m ctxprop``."""

import sys

from ctxprop._cli import main

sys.exit(main())
