"""`python3 -m cli ...`: the same as `deft-cli ...`."""

from cli import main

main()
