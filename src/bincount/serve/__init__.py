"""Serving: the SageMaker inference handler (:mod:`.inference`) and the HTTP app that runs it (:mod:`.app`).

Offline counting is beside it: :mod:`bincount.predict` (photo files, folders and S3 prefixes to
a CSV) and :mod:`bincount.transform_collect` (a SageMaker Batch Transform job's answers to the same CSV).

The handler's parts: :mod:`.request` (the wire format: content types, ``Accept``, custom
attributes, the JSON body; body -> photos), :mod:`.images` (encoded photo or S3 object -> tensor,
within the request limits), :mod:`.model` (loading, forward pass, verdicts) and :mod:`.errors`
(client mistakes and their status codes); :mod:`.inference` also holds the settings. The app adds
:mod:`.batching`.
"""

from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn, transform_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn", "transform_fn"]
