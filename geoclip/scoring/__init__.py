"""Scoring: large scenes, local or on S3, to blended class-map and probability COGs with area summaries, each scene
exactly once per (content, model) through a claim ledger; and tile prediction to CSV.

Reading and window geometry (``scene_io``), blending and writing (``blend``), one scene (``score``), the ledger
(``ledger``), exactly-once runs (``exactly_once``), the plan shared by the CLI and the Prefect flow (``runs``),
tiles to CSV (``predict``). May import ``registry`` (to load the served model), ``data`` (scene checks, S3) and the
shared top-level modules.
"""
