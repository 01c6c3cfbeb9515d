"""``python -m qkv_native`` runs the ``qkv-native`` command line (see :mod:`qkv_native.cli`)."""

from .cli import main

raise SystemExit(main())
