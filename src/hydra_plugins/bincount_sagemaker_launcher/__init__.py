"""``hydra/launcher=sagemaker``: each job of a Hydra multirun becomes a SageMaker training job."""
