import sys

from fdjax.cli import main

sys.exit(main())
