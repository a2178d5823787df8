"""`python -m vllm_gds.cli`: the `vllm-gds` command."""

import sys

from vllm_gds.cli import main

sys.exit(main())
