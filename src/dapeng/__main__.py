import sys

from dapeng.cli.main import main

sys.exit(main())
