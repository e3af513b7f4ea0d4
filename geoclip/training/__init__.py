"""Training and measuring the model: the per-rank training loop (torchrun, DDP), exact checkpoints, evaluation
metrics and few-shot adaptation.

Functions here return their results and write files; they never log to a tracking server themselves: the stage
entry points (``geoclip.stages``) hand training a run log and log evaluation results to MLflow. May import
``model``, ``data`` and the shared top-level modules; never MLflow, DVC, boto3 or Prefect.
"""
