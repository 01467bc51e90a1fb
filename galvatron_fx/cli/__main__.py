import sys

from galvatron_fx.cli import main

sys.exit(main())
