"""`python -m delrec …` is the `delrec` command."""

from delrec.cli import main

raise SystemExit(main())
