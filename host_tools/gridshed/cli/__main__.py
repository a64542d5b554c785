"""`python -m gridshed.cli`: the same as the `gridshed` command."""
import sys

from . import main

sys.exit(main())
