"""``python -m nf4kit [demo|info]``."""
from .cli import main

raise SystemExit(main())
