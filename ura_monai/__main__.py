"""``python -m ura_monai``: the ``ura-monai`` command line (see :mod:`ura_monai.cli`)."""

from ura_monai.cli import main

raise SystemExit(main())
