"""Serving: the SageMaker inference handler (:mod:`.inference`), the HTTP app that runs it (:mod:`.app`),
batch prediction over files, folders and S3 prefixes (:mod:`.predict`), and the CSV of a SageMaker
Batch Transform job's answers (:mod:`.collect`).

The handler's parts: :mod:`.settings` (limits, review threshold, environment), :mod:`.protocol`
(content types, ``Accept``, custom attributes), :mod:`.schema` (the JSON body), :mod:`.images`
(decoding), :mod:`.fetch` (S3), :mod:`.request` (body -> photos), :mod:`.model` (loading, forward
pass), :mod:`.verdict` (answers) and :mod:`.errors` (status codes). The app adds :mod:`.batching`.
"""

from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn, transform_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn", "transform_fn"]
