from deft_lightning.cli import main

main()
