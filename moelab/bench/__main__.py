"""`python -m moelab.bench` = `moelab bench`."""

import sys

from moelab.bench.runner import main

sys.exit(main())
