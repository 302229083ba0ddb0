"""Allow `python -m pflm`."""
import sys

from pflm.cli import main

sys.exit(main())
