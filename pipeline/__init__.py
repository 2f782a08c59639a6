"""Experiment-tracking pipeline for PyTorch image classification.

Modules, one concern each; imports go one way, from the CLI down:

    cli -> stages, commands          what `python -m pipeline <command>` runs (stages = DVC stages)
        -> tuning (Optuna), tracking (MLflow), serving (the logged MLflow model)
        -> training                  setup shared by every run and trial
        -> loop                      the one training loop (callbacks, checkpoints)
        -> data, datasets, models, evaluation, reporting
        -> config, metrics, files, paths, processes, errors
"""
