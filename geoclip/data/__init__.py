"""Data: bring tiles in (synthetic, folders, manifests, S3), check them with Great Expectations, split and pack them.

Owns the raw and prepared layouts (``data/raw``, ``data/prepared``), the expectation suites' runner, the DVC data
version and S3 access. May import the shared top-level modules (errors, bands, config, ioutils, plots) and no other
geoclip subpackage: everything else builds on data, not the other way round.
"""
