"""``python -m fastdpo.cli`` (and ``torchrun -m fastdpo.cli``): the console script."""
import sys

from fastdpo.cli import main

sys.exit(main())
