"""geoclip: CLIP-style contrastive learning between Sentinel-2 tiles and ground-cover classes.

A map for newcomers, from the bottom layer up (import-linter contracts in pyproject.toml hold it):

- ``errors``, ``retries``, ``bands``, ``ioutils``, ``plots``, ``config``: the vocabulary every layer shares
  (the error type, which failures are worth a retry, band and class metadata, atomic writes, figures, typed params).
- ``data``: tiles in, checked and packed: ingest, synthetic data, Great Expectations suites, splits, DVC, S3.
- ``model``: the GeoCLIP model itself: image encoder, class (text) encoder, losses, augmentation.
- ``training``: the training loop under torchrun, checkpoints, evaluation metrics, few-shot adaptation.
- ``registry``: MLflow: tracking runs, the pyfunc, registration and aliases, export, loading models back.
- ``scoring``: large scenes to class-map COGs, exactly once, and tile prediction.
- ``stages``: the pipeline stages, one function each, as dvc.yaml (through the CLI) and the Prefect flows call them.
- ``cli``: the ``geoclip`` command; ``devtools``: local services and the diagrams, for developers.
"""

__version__ = "0.1.0"
