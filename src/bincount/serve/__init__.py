"""Serving: the SageMaker inference handler (:mod:`.inference`) and the HTTP app that runs it (:mod:`.app`).

Offline counting is beside it: :mod:`bincount.predict` (photo files, folders and S3 prefixes to
a CSV) and :mod:`bincount.transform_collect` (a SageMaker Batch Transform job's answers to the same CSV).

The handler's parts: :mod:`.settings` (limits, review threshold, environment), :mod:`.protocol`
(content types, ``Accept``, custom attributes), :mod:`.schema` (the JSON body), :mod:`.images`
(decoding), :mod:`.fetch` (S3), :mod:`.request` (body -> photos), :mod:`.model` (loading, forward
pass), :mod:`.verdict` (answers) and :mod:`.errors` (status codes). The app adds :mod:`.batching`.
"""

from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn, transform_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn", "transform_fn"]
