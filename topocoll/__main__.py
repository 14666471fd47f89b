"""`python -m topocoll` is the `topocoll` command."""

from topocoll.cli import main

raise SystemExit(main())
