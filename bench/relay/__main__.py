import sys

from bench.relay.run import main

sys.exit(main())
