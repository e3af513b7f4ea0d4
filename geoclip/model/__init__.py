"""The GeoCLIP model: a multispectral image encoder and a ground-cover class encoder in one embedding space.

Owns the module (``clip``), the sentence-encoder text side (``text``), the contrastive losses (``loss``), the
square-symmetry augmentation (``augment``) and open-set scores (``openset``). Pure PyTorch: may import the shared
top-level modules only; never MLflow, DVC, boto3 or Prefect, and no other geoclip subpackage.
"""
