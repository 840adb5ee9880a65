"""`python -m ssm_split` is the `ssm-split` command."""

import sys

from ._cli import main

sys.exit(main())
