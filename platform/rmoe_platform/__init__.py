"""rmoe_platform: the Ray layer (Train stages, Tune sweeps, Ray Data ingest, cost accounting, results).

Source root is `platform/` (never a package itself: a package named `platform` would shadow the
standard library's `platform` module and break `import ray`).
"""

__version__ = "0.1.0"
