"""Dataset construction (paper §4.1, appendix A.1) and the training-record readers.

- :func:`build_dataset` / :class:`BuildConfig` (:mod:`omniportrait.data.build`): folder, webdataset or
  URL-table input → filtered, annotated webdataset shards (or plain folders), ``index.parquet`` and a
  report; resumable, on a local process pool or Ray.
- :class:`TrainingRecord` (:mod:`omniportrait.data.records`): what one record holds.
- :class:`TrainingRecordDataset`, :func:`iter_records` (:mod:`omniportrait.data.loader`): read records
  back for training.

See ``docs/dataset.md``. Names are imported lazily so that ``import omniportrait.data`` stays cheap.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "BuildConfig": "omniportrait.data.build",
    "BuildResult": "omniportrait.data.manifest",
    "build_dataset": "omniportrait.data.build",
    "FilterConfig": "omniportrait.data.filters",
    "REASONS": "omniportrait.data.filters",
    "TrainingRecord": "omniportrait.data.records",
    "TrainingRecordDataset": "omniportrait.data.loader",
    "iter_records": "omniportrait.data.loader",
    "collate_records": "omniportrait.data.loader",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'omniportrait.data' has no attribute {name!r}")
