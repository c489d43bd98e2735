"""``python -m token2wav`` runs the same command line as the ``token2wav`` script."""

from token2wav.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
