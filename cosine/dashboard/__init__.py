"""The queue dashboard (``cosine dashboard``): see :mod:`cosine.dashboard.app`."""
