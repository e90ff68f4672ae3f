import sys

from bench.backlog.run import main

sys.exit(main())
