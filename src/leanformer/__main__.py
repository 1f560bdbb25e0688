"""`python -m leanformer` (and `torchrun -m leanformer`) runs the CLI."""

import sys

from .cli.main import main

sys.exit(main())
