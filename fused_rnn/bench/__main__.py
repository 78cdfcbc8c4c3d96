"""``python -m fused_rnn.bench ARGS`` == ``fused-rnn bench ARGS``."""
import sys

from .command import main

sys.exit(main())
