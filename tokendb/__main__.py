"""``python -m tokendb``: the ``tokendb`` command."""

from tokendb.cli import main

main()
