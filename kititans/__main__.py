"""`python -m kititans` == the `kititans` console script."""

import sys

from kititans.cli import main

sys.exit(main())
