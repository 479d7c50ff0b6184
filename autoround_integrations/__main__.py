"""``python -m autoround ...`` (and ``torchrun --nproc_per_node N -m autoround ...``): the ``auto-round`` CLI."""

import sys

from autoround.quantizer.cli import main

if __name__ == "__main__":
    sys.exit(main(prog="autoround"))
