"""Serving: the SageMaker inference handler (:mod:`.inference`) and the HTTP app that runs it (:mod:`.app`)."""

from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn, transform_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn", "transform_fn"]
