"""``python -m lattice_plugin`` is the ``lattice`` command."""

from lattice_plugin.cli import main

if __name__ == "__main__":
    main()
