"""`python -m fused_rnn` runs the `fused-rnn` command (see fused_rnn.cli)."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
