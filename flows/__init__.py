"""Prefect 3 flows around the geoclip library: glue only, each task calls one library function.

geoclip never imports this package; which failures are retried is decided in the library (geoclip.retries).
"""
