"""Several runs trained at once on the one loop (`population.fit_together`, `stacking.Stack`): every run's numbers
are the numbers it gets alone, and runs join and leave while the others train on."""

import copy
import warnings

import pytest
import torch
from torch import nn

from helpers import member
from pipeline import loop, population, training
from pipeline.population import fusion, stacking
from pipeline.models import build_model

CPU = torch.device("cpu")
# fp32, no dropout: the same arithmetic alone and together, up to the summation order of grouped kernels
# (observed: ~1e-7 per epoch on digits). bf16 rounds those orders differently (~1e-3, like another thread count).
EXACT = {"train.precision": "fp32", "model.dropout": 0.0}
TOLERANCE = {"rel": 1e-4, "abs": 1e-5}
# what each run of a population may have of its own
VARIANTS = [{"train.lr": 1e-3},
            {"train.lr": 3e-3, "train.optimizer": "sgd", "train.weight_decay": 1e-3, "train.scheduler": "step",
             "train.step_size": 1, "train.gamma": 0.5},
            {"train.lr": 2e-3, "train.optimizer": "adamw", "train.label_smoothing": 0.1, "train.scheduler": "onecycle",
             "train.grad_clip": 0.5},
            {"train.lr": 5e-4, "train.weight_decay": 1e-4, "train.scheduler": "plateau", "train.patience": 2,
             "data.augment.crop_padding": 1}]
# Not rmsprop here: its 1/sqrt(running mean of g^2) turns a 1-ulp difference in a near-zero gradient into an
# lr-sized step, so its runs drift apart at ~1e-4 per epoch even when every other number agrees.


class Pruned(Exception):
    pass


class StopAt(loop.Callback):
    """Raises after `epoch`, as a pruned trial's callback does."""

    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, metrics):
        if metrics.epoch == self.epoch:
            raise Pruned(f"after epoch {metrics.epoch}")


def assert_same_history(together, alone):
    assert len(together) == len(alone)
    for mine, theirs in zip(together, alone):
        for name in ("train_loss", "train_accuracy", "val_loss", "val_accuracy", "lr"):
            assert getattr(mine, name) == pytest.approx(getattr(theirs, name), **TOLERANCE), (mine.epoch, name)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_each_run_of_a_population_gets_the_numbers_it_gets_alone(digits, tiny_cfg, model):
    cfgs = [tiny_cfg.with_overrides({**EXACT, "model.name": model, **variant}) for variant in VARIANTS]
    alone = []
    for cfg in cfgs:
        model_, train_batches, val_batches = training.setup(cfg, digits, CPU)
        alone.append(loop.fit(model_, train_batches, val_batches, cfg.train, CPU))

    # two start together; one leaves after epoch 2 (pruned); each time a run ends, a new one joins at its own
    # first epoch while the other trains on
    first = [member(cfgs[0], digits), member(cfgs[1], digits, [StopAt(2)])]
    late, last = member(cfgs[2], digits), member(cfgs[3], digits)
    for key, each in enumerate([*first, late, last]):
        each.key = key
    pending, told = [late, last], []

    def next_members(ended, training_now):
        told.append(([each.key for each in ended], training_now))
        return [pending.pop(0)] if ended and pending else []

    population.fit_together(first, CPU, next_members)

    assert isinstance(first[1].error, Pruned) and first[1].result is None
    assert len(first[1].history) == 2
    assert_same_history(first[1].history, alone[1].history[:2])
    for together, by_itself in ((first[0], alone[0]), (late, alone[2]), (last, alone[3])):
        assert together.error is None
        assert_same_history(together.result.history, by_itself.history)
        assert together.result.best_epoch == by_itself.best_epoch
        # its own weights (not compared value by value: Adam's step is lr-sized whatever the gradient's size, so
        # the few weights whose gradient is ~0 move by rounding noise, alone as together)
        assert together.result.best_state.keys() == by_itself.best_state.keys()
    # told which run ended and how many still train: 1 after epoch 2, 0 after epoch 3 (late at 1), 2 ... 3 last
    assert [entry for entry in told if entry[0]] == [([1], 1), ([0], 1), ([2], 1), ([3], 0)]


def test_ctrl_c_stops_the_whole_population(digits, tiny_cfg):
    """A run's own exception ends that run only; KeyboardInterrupt (Ctrl-C, SIGTERM) ends them all, at once."""

    class Interrupt(loop.Callback):
        def on_epoch_end(self, metrics):
            raise KeyboardInterrupt

    runs = [member(tiny_cfg.with_overrides({**EXACT, **variant}), digits) for variant in VARIANTS[:2]]
    runs[1].callbacks = [Interrupt()]
    with pytest.raises(KeyboardInterrupt):
        population.fit_together(runs, CPU)
    assert [len(run.history) for run in runs] == [1, 1] and not any(run.ended for run in runs)


def test_runs_that_differ_only_in_what_a_trial_has_of_its_own_are_fused(digits, tiny_cfg):
    """What a population search lets each trial draw (fusion.OWN_PER_RUN): runs differing in all of it are
    still one forward pass. A key listed there that the engine cannot fuse would split every population."""
    own = {"train.lr": 3e-3, "train.optimizer": "sgd", "train.momentum": 0.5, "train.nesterov": True,
           "train.weight_decay": 1e-3, "train.scheduler": "step", "train.step_size": 2, "train.gamma": 0.5,
           "train.label_smoothing": 0.1, "train.grad_clip": 1.0, "train.patience": 2, "train.monitor_window": 1,
           "model.dropout": 0.3}
    assert set(own) == set(fusion.OWN_PER_RUN)
    augmented = {"data.augment.crop_padding": 1, "data.augment.rotation": 10.0, "data.augment.brightness": 0.2}
    runs = [member(tiny_cfg.with_overrides(overrides), digits)
            for overrides in [{}, own, augmented, *({key: value} for key, value in own.items())]]
    assert [len(group) for group in population.groups(runs, CPU)] == [len(runs)]


def test_runs_are_fused_only_when_their_models_and_batches_match(digits, tiny_cfg):
    def runs(*overrides):
        return [member(tiny_cfg.with_overrides({**EXACT, **each}), digits) for each in overrides]

    same = runs({"train.lr": 1e-3}, {"train.lr": 1e-2, "train.optimizer": "sgd"}, {"model.dropout": 0.3})
    assert [len(group) for group in population.groups(same, CPU)] == [3]
    for member_ in same:
        member_.start(CPU)
    mixed = runs({}, {"train.batch_size": 32}, {"train.batch_size": 63}, {"model.channels": [16, 32]},
                 {"train.compile": True}, {"train.precision": "bf16"}, {"model.name": "resnet18"}, {})
    assert len(mixed[0].train_batches) == len(mixed[2].train_batches)  # batch 63 or 64: 20 batches
    assert sorted(len(group) for group in population.groups(mixed, CPU)) == [1, 1, 1, 1, 1, 1, 2]


@pytest.mark.parametrize("model, chunked", [("cnn", False), ("cnn", True), ("mlp", False), ("logreg", False),
                                           ("digit_recognizer", True)])
def test_a_stack_computes_what_its_members_compute(tiny_cfg, model, chunked, monkeypatch):
    if chunked:  # on a CPU, large convolutions are computed one member per call (`members_per_call`)
        monkeypatch.setattr(fusion, "CPU_CONV_MEMBER_VALUES", 0)
    cfg = tiny_cfg.with_overrides({"model.name": model, "model.dropout": 0.0})
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(cfg.model, (1, 8, 8), 10))
    alone = copy.deepcopy(members)
    stack = stacking.Stack(members)
    inputs = torch.randn(3, 16, 1, 8, 8)
    for train in (True, False):
        stack.train(train)
        for each in alone:
            each.train(train)
        expected = torch.stack([each(x) for each, x in zip(alone, inputs)])
        torch.testing.assert_close(stack(inputs), expected, rtol=1e-5, atol=1e-6)
    assert stack.chunk == 1 if chunked else stack.chunk >= 3  # one by one, or all three in one call
    for mine, theirs in zip(members, alone):  # BatchNorm's running statistics, per member
        for (name, value), other in zip(mine.state_dict().items(), theirs.state_dict().values()):
            torch.testing.assert_close(value, other, rtol=1e-5, atol=1e-6, msg=name)


def test_a_cpu_fuses_convolutions_only_while_each_members_activations_are_small(tiny_cfg):
    """What `members_per_call` decides from the measurements in its docstring: digits-size CNNs fused at every
    batch size searched, 28x28 CNNs one at a time even at batch 16; linear models and GPUs fuse everything."""
    cnn, mlp = (build_model(tiny_cfg.with_overrides({"model.name": name}).model, (1, 8, 8), 10)
                for name in ("cnn", "mlp"))
    assert all(fusion.members_per_call(cnn, batch, (8, 8), CPU) == fusion.ALL for batch in (32, 64, 128))
    assert fusion.members_per_call(cnn, 16, (28, 28), CPU) == 1
    assert fusion.members_per_call(cnn, 128, (28, 28), torch.device("cuda")) == fusion.ALL
    assert fusion.members_per_call(mlp, 128, (28, 28), CPU) == fusion.ALL


def autograd_nodes(output: torch.Tensor) -> int:
    """How many backward functions (one per op, one per leaf gradient) produce `output`'s gradients."""
    seen, todo = set(), [output.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and node not in seen:
            seen.add(node)
            todo.extend(next_node for next_node, _ in node.next_functions)
    return len(seen)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_a_stacks_backward_is_the_same_size_whatever_its_members(tiny_cfg, model):
    """A Stack computes on one tensor per layer and name (`stacking.Fused`), so one step launches as many kernels
    for 16 members as for 2 (on a GPU, where a small model's step is launch-bound). Gathering the members' own
    tensors every step (a cat per parameter) grew the backward by one node per member and parameter."""
    cfg = tiny_cfg.with_overrides({"model.name": model})

    def nodes(k):
        stack = stacking.Stack([build_model(cfg.model, (1, 8, 8), 10) for _ in range(k)]).train()
        return autograd_nodes(stack(torch.randn(k, 4, 1, 8, 8)).sum())

    assert nodes(2) == nodes(16)


def test_each_member_of_a_stack_gets_its_own_gradient_and_keeps_its_own_tensors(tiny_cfg):
    """The members' parameters are blocks of the Stack's fused tensors: a member's optimizer steps its own block
    with its own gradient, and its running statistics are its own."""
    cfg = tiny_cfg.with_overrides({"model.dropout": 0.0})
    members = []
    for seed in range(3):
        torch.manual_seed(seed)
        members.append(build_model(cfg.model, (1, 8, 8), 10).to(memory_format=torch.channels_last))  # as the loop
    alone = copy.deepcopy(members)
    stack = stacking.Stack(members).train()
    inputs = torch.randn(3, 16, 1, 8, 8)
    stack(inputs).square().sum().backward()
    for each, x in zip(alone, inputs):
        each.train()(x).square().sum().backward()
    for mine, theirs in zip(members, alone):
        for (name, value), other in zip(mine.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(value.grad, other.grad, rtol=1e-4, atol=1e-5, msg=name)
            assert value.stride() == other.stride(), name  # the member's own layout (a conv picks kernels by it)
    torch.optim.SGD(members[1].parameters(), lr=0.1).step()  # member 1 alone moves
    for index, (mine, theirs) in enumerate(zip(members, alone)):
        moved = [not torch.equal(value, other) for value, other in zip(mine.parameters(), theirs.parameters())]
        assert all(moved) if index == 1 else not any(moved)
    with torch.no_grad():  # the stack computes with what the members hold
        torch.testing.assert_close(stack.eval()(inputs)[1], members[1].eval()(inputs[1]), rtol=1e-5, atol=1e-6)


def test_a_stacks_fused_tensors_go_with_it(tiny_cfg):
    """When a population changes, its old Stack's fused tensors are freed at once (on a GPU, that memory is the
    next Stack's), not when the garbage collector next runs: nothing they hold holds them back."""
    import gc
    import weakref

    members = [build_model(tiny_cfg.model, (1, 8, 8), 10) for _ in range(2)]
    stack = stacking.Stack(members).train()
    stack(torch.randn(2, 4, 1, 8, 8)).sum().backward()
    fused = weakref.ref(stack.fused[0]["weight"].tensor)
    gc.disable()
    try:
        del stack
        assert fused() is None
    finally:
        gc.enable()
    assert all(parameter.grad is not None for parameter in members[0].parameters())  # the members keep theirs


def test_dropout_keeps_each_members_own_rate(tiny_cfg):
    models = []
    for rate in (0.0, 0.5):
        torch.manual_seed(0)
        models.append(build_model(tiny_cfg.with_overrides({"model.name": "mlp", "model.dropout": rate}).model,
                                  (1, 8, 8), 10))
    alone = copy.deepcopy(models[0]).train()
    stack = stacking.Stack(models).train()
    inputs = torch.randn(2, 4096, 1, 8, 8)
    out = stack(inputs)
    torch.testing.assert_close(out[0], alone(inputs[0]))  # rate 0: untouched
    undropped = copy.deepcopy(models[1]).eval()(inputs[1])
    assert not torch.allclose(out[1], undropped)  # rate 0.5: the stack dropped some of member 1's units
    hidden = nn.Sequential(*list(models[1])[:3])(inputs[1])  # member 1's first hidden layer, before dropout
    dropped = stacking._dropout(hidden[None], torch.tensor([1 - 0.5]), stacked=True)[0]
    assert (dropped == 0).float().mean().item() == pytest.approx(0.5 + 0.5 * (hidden == 0).float().mean().item(),
                                                                 abs=0.02)


def test_models_that_cannot_be_fused_are_refused_by_a_stack(tiny_cfg):
    resnet = build_model(tiny_cfg.with_overrides({"model.name": "resnet18"}).model, (3, 32, 32), 10)
    assert fusion.signature(resnet) is None
    cnn = build_model(tiny_cfg.model, (1, 8, 8), 10)
    wider = build_model(tiny_cfg.with_overrides({"model.channels": [8, 16]}).model, (1, 8, 8), 10)
    with pytest.raises(ValueError, match="same fusable layers"):
        stacking.Stack([cnn, wider])


@pytest.mark.gpu
def test_a_population_on_cuda_gets_the_numbers_its_runs_get_alone(digits, tiny_cfg):
    cuda = torch.device("cuda")
    allowed = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 here
    try:
        cfgs = [tiny_cfg.with_overrides({**EXACT, "train.device": "cuda", **variant}) for variant in VARIANTS]
        alone = []
        for cfg in cfgs:
            model, train_batches, val_batches = training.setup(cfg, digits, cuda)
            alone.append(loop.fit(model, train_batches, val_batches, cfg.train, cuda))
        together = [member(cfg, digits, device=cuda) for cfg in cfgs]
        population.fit_together(together, cuda)
        for mine, theirs in zip(together, alone):
            assert_same_history(mine.result.history, theirs.history)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = allowed
    # the default format on CUDA (bf16 autocast): rounding differs (another kernel per shape), learning does not
    cfgs = [tiny_cfg.with_overrides({"train.device": "cuda", "train.epochs": 5, **variant}) for variant in VARIANTS]
    runs = [member(cfg, digits, device=cuda) for cfg in cfgs]
    population.fit_together(runs, cuda)
    for run, cfg in zip(runs, cfgs):
        model, train_batches, val_batches = training.setup(cfg, digits, cuda)
        alone = loop.fit(model, train_batches, val_batches, cfg.train, cuda)
        assert run.result.best.val_accuracy == pytest.approx(alone.best.val_accuracy, abs=0.05)


@pytest.mark.gpu
@pytest.mark.parametrize("runs", [1, 3])
def test_a_cuda_epoch_waits_for_the_gpu_only_at_its_end(digits, tiny_cfg, runs):
    """The loop's promise (see its docstring): within an epoch the host never waits for the GPU (no .item(), no
    blocking copy), so it queues the next steps while the GPU computes. torch's sync debug mode reports each
    wait: an epoch of 72 steps must wait as often as one of 9."""
    cuda = torch.device("cuda")

    def waits(batch_size):
        cfgs = [tiny_cfg.with_overrides({"train.device": "cuda", "train.epochs": 1, "train.batch_size": batch_size,
                                         **variant}) for variant in VARIANTS[:runs]]
        members = [member(cfg, digits, device=cuda) for cfg in cfgs]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                population.fit_together(members, cuda)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        assert all(each.result is not None for each in members)
        return sum("synchroniz" in str(warning.message) for warning in caught)

    waits(128)  # once first: CUDA and its libraries set themselves up on first use (and wait for the GPU then)
    assert waits(128) == waits(16)


@pytest.mark.parametrize("model", ["cnn", "mlp"])
def test_seed_replicates_trained_together_get_the_numbers_each_gets_alone(digits, tiny_cfg, model):
    """A config's replicates are the ideal population (one group: same shapes, every member every epoch); each
    gets what its seed gets alone, and the seeds differ."""
    cfg = tiny_cfg.with_overrides({**EXACT, "model.name": model, "replicates": 3})
    members = training.replicate_configs(cfg)
    assert [each.seed for each in members] == [42, 43, 44]
    alone = [loop.fit(*training.setup(each, digits, CPU), each.train, CPU) for each in members]
    together = [member(each, digits) for each in members]
    assert len(fusion.groups(together, CPU)) == 1
    population.fit_together(together, CPU)
    for run, by_itself in zip(together, alone):
        assert_same_history(run.result.history, by_itself.history)
    assert len({run.result.history[-1].train_loss for run in together}) == 3
    assert training.shipped(cfg, [run.result for run in together]) == \
        min(range(3), key=lambda i: (together[i].result.best_score, i))
