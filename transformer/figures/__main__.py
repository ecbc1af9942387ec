"""``python -m transformer.figures``: see ``transformer.figures.command``."""

import sys

from transformer.figures.command import main

sys.exit(main())
