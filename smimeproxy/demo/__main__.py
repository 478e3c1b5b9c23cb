"""``python -m smimeproxy.demo``: see :mod:`smimeproxy.demo`."""

import sys

from smimeproxy.demo import main

sys.exit(main())
