import sys

from sophia_cli import main

sys.exit(main())
