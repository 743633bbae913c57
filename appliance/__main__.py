"""``python -m appliance`` is the ``appliance`` command."""
from .cli.__main__ import main

if __name__ == "__main__":
    main()
