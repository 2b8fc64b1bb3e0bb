"""``python -m nativereload``: the same as the ``nativereload`` command."""

from .cli import main

raise SystemExit(main())
