"""`python -m shared.cli` is the `lyra` command."""

import sys

from shared.cli.main import main

sys.exit(main())
