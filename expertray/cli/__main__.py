"""`python -m expertray.cli`: the same app as the `expertray` command."""

from expertray.cli.main import main

main()
