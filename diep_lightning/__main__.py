"""``python -m diep_lightning``: see :mod:`diep_lightning.main`."""

from diep_lightning.main import main

if __name__ == "__main__":
    main()
