"""``python -m brainmm`` (and ``torchrun -m brainmm pretrain ...``)."""

import sys

from .cli import main

sys.exit(main())
