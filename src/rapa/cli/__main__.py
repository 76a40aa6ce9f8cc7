import sys

from rapa.cli import main

sys.exit(main())
