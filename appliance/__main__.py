"""`python -m appliance` is the `intrapush` command."""

import sys

from appliance.cli import main

sys.exit(main())
