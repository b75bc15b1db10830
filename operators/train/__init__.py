"""Two-stage supervised fine-tuning: data preparation, DeepSpeed ZeRO-3 training, evaluation, cluster specs.

`config` holds the pydantic configs (importable by DAG files: no heavy imports), `data_prep` the
tokenize/mask/pack step, `trainer` the Hugging Face Trainer + DeepSpeed run, `evaluate` the held-out
loss and the small benchmark suite, `stages` the two-stage / one-stage plan, `cluster` the pure
rendering of a multi-GPU training pod or indexed Job.
"""
