"""largeloss: weakly supervised multi-label classification at scale (Kim et al., CVPR 2022, "Large Loss Matters").

The repository root is this package: its folders ingest/, shards/, train/, eval/ and configs/ are installed as
largeloss.ingest, largeloss.shards, ... (pyproject.toml). Layers, each importing only those below it:
shards (the on-disk formats and loaders) < ingest, eval < train.
"""
__version__ = "0.1.0"
