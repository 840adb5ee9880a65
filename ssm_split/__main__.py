"""`python -m ssm_split` is the `ssm-split` command."""

import sys

from .cli._main import main

sys.exit(main())
