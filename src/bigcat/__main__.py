"""``python -m bigcat`` runs the command line."""

from bigcat.cli import entry_point

if __name__ == "__main__":
    entry_point()
