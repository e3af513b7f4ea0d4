"""Developer tools outside the core library: local services (moto S3, MLflow, Prefect on 127.0.0.1) and the
architecture and sample diagrams. Only the CLI imports this package; no library module does.
"""
