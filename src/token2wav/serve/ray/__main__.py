"""``python -m token2wav.serve.ray [serve options]``: the same as ``token2wav serve --ray [serve options]``."""

from __future__ import annotations

import sys

from token2wav.cli import main

if __name__ == "__main__":
    sys.exit(main(["serve", "--ray", *sys.argv[1:]]))
