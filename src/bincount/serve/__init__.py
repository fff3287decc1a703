"""Serving: the SageMaker inference handler (:mod:`.inference`), its HTTP app (:mod:`.app`) and batch
prediction over files, folders and S3 prefixes (:mod:`.predict`)."""

from bincount.serve.inference import input_fn, model_fn, output_fn, predict_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn"]
