"""``python -m layerviz``: the CLI, also as the module that torchrun and accelerate launch start."""

import sys

from layerviz.cli import main

sys.exit(main())
