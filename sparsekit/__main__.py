"""``python -m sparsekit`` runs the CLI."""

from sparsekit.cli.main import main

if __name__ == "__main__":
    main()
