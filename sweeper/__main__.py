"""``python -m sweeper``: the command line (sweeper.cli)."""

from sweeper.cli import main

if __name__ == "__main__":
    main()
