"""`python -m rlx.train --config X.toml [--section.key=value ...]`: the RL trainer entry point for
torchrun and SLURM (the same as `rlx train`)."""

import sys

from rlx.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
