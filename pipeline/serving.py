"""The MLflow model a training run logs: MLflow's "models from code", holding weights only.

MLflow loads this file (shipped with the `pipeline` package as code) and the
model's weights file through `models.load_classifier`, which reads tensors with
`torch.load(weights_only=True)`: serving the model never unpickles anything.
Input: pixels scaled to [0, 1], float32 [N, C, H, W]; output: class probabilities.

`python -m pipeline predict --model models:/…` does not even run this file: it
downloads the weights and loads them with the local code.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
import numpy as np
from mlflow.models import set_model

from pipeline.tracking import WEIGHTS


class ImageClassifier(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from pipeline.models import load_classifier

        self.classifier = load_classifier(Path(context.artifacts[WEIGHTS]))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        import torch

        pixels = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.classifier(pixels).numpy()


set_model(ImageClassifier())
