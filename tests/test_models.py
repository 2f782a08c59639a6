import pytest
import torch

from pipeline.config import Config, ModelConfig
from pipeline.models import BUILDERS, build_model, count_parameters, load_model, save_model


@pytest.mark.parametrize("name", sorted(BUILDERS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_every_model_adapts_to_input_shape_and_classes(name, shape):
    model = build_model(ModelConfig(name=name), shape, 7)
    assert model(torch.zeros(2, *shape)).shape == (2, 7)


def test_saved_model_loads_with_weights_only(tmp_path):
    cfg = Config()
    model = build_model(cfg.model, (1, 8, 8), 10)
    path = tmp_path / "model.pt"
    save_model(path, model.state_dict(), cfg, [str(i) for i in range(10)], (1, 8, 8), [0.3], [0.4], best_epoch=3)
    payload = torch.load(path, weights_only=True)
    assert payload["best_epoch"] == 3 and payload["config"]["model"]["name"] == "cnn"
    loaded, _ = load_model(path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model.eval()(x))
    assert count_parameters(loaded) == count_parameters(model)
