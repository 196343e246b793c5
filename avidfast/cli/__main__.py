"""`python -m avidfast.cli`."""
import sys

from avidfast.cli import main

sys.exit(main())
