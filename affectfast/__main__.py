"""``python -m affectfast`` (what ``torchrun -m affectfast train ...`` runs)."""

from affectfast.cli import main

if __name__ == "__main__":
    main()
