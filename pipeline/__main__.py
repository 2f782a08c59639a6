import gc

from pipeline.cli import main

code = main()
# Python's last garbage collection at exit walks every object torch, MLflow and SQLAlchemy created, in every one
# of the stage processes `dvc repro` starts. Freezing them skips a walk whose memory the OS takes back anyway;
# atexit handlers (MLflow's flushes) and the flushing of stdout/stderr still run.
gc.freeze()
raise SystemExit(code)
