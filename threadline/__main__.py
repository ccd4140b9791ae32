"""`python -m threadline` is the `threadline` command."""

from threadline.main import main

raise SystemExit(main())
