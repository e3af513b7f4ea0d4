"""MLflow: runs and their tags (``tracking``), the served pyfunc (``pyfunc``), registration with the champion gate
(``register``), aliases moved by people (``aliases``), loading models back (``models``) and TorchScript/ONNX export
(``export``).

May import ``model``, ``data`` and the shared top-level modules, not ``training``, ``scoring`` or the stages.
"""
