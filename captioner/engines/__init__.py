"""Engines: `extract` and `caption-batch` over folders, WebDataset shards and parquet, in this process or on Ray Data.

sources (captioner.data.sources) -> blocks -> parts (engines.parts) -> one output. `extract.py`
and `caption_batch.py` are the two commands; `pipeline.py` what they share; `runner.py` runs
blocks locally or as a Ray Data pipeline; `work.py` is one block's work, the same on both.
Layer: imports anything below (root, data, vision, models, scoring, decoding), never stages or
serving; only the CLI imports it. Ray is optional (`pip install 'captioner[ray]'`).
"""
