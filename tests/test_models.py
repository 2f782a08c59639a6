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


def test_the_model_file_depends_on_the_train_stage_params_only(tmp_path):
    """Its bytes are a DVC output: a param the stage does not declare (stores, search, tracking) must not show."""
    cfg = Config()
    model = build_model(cfg.model, (1, 8, 8), 10)
    args = ([str(i) for i in range(10)], (1, 8, 8), [0.3], [0.4])
    save_model(tmp_path / "a.pt", model.state_dict(), cfg, *args)
    other = cfg.with_overrides({"tracking.uri": "http://elsewhere:5000", "tune.n_trials": 3, "data.mirror": "file:///m"})
    save_model(tmp_path / "b.pt", model.state_dict(), other, *args)
    assert (tmp_path / "a.pt").read_bytes() == (tmp_path / "b.pt").read_bytes()
    save_model(tmp_path / "c.pt", model.state_dict(), cfg.with_overrides({"train.lr": 0.5}), *args)
    assert (tmp_path / "a.pt").read_bytes() != (tmp_path / "c.pt").read_bytes()
