"""`python -m controller.gateway`: one agent gateway process (see `controller.gateway.process`)."""

import sys

from controller.gateway.process import main

sys.exit(main())
