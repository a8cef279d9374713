import sys

from neoxrt.cli import main

sys.exit(main())
