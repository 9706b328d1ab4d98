import sys

from diffkiln.cli import main

sys.exit(main())
