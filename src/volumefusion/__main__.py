"""``python -m volumefusion`` (what torchrun launches with ``-m volumefusion``)."""

import sys

from volumefusion.cli import main

sys.exit(main())
