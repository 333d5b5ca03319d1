"""``python -m deft_lightning <command>``: see :mod:`deft_lightning.commands`."""

from deft_lightning.commands import main

main()
