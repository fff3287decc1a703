"""Run bincount's Hydra experiments as SageMaker jobs.

``launch`` (compose the training config locally -> a training job), ``entry`` (the job's container
side), ``tune`` (a hyperparameter tuning job over an ``hparams_search`` space), ``deploy``
(model, endpoint config, endpoint; invoke; delete) and ``cost`` (instance-hours x price).
"""
