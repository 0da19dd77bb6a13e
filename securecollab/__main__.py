"""`python -m securecollab` == the `securecollab` command."""

import sys

from securecollab.cli import main

sys.exit(main())
