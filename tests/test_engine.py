"""The engine in this process on XLA:CPU, with a tiny linear model: graphs compile in seconds.

Compile counts are read from torch_xla.debug.metrics here, in the process that compiles.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from leaf_xla import backends
from leaf_xla.engine import NonFiniteLoss, Trainer, create_optimizer
from leaf_xla.guard import optimizer_tensors
from leaf_xla.loader import eval_batches
from leaf_xla.settings import MixSettings

CLASSES, SIZE, BATCH = 4, 4, 6
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def compiles() -> int:
    import torch_xla.debug.metrics as met

    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * SIZE * SIZE, CLASSES))


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, CLASSES, (BATCH,), generator=gen)
        out.append(
            {
                "image": torch.randint(0, 256, (BATCH, 3, SIZE, SIZE), generator=gen).byte(),
                "target": F.one_hot(labels, CLASSES).float(),
                "index": torch.arange(BATCH, dtype=torch.int32),
                "mask": torch.ones(BATCH),
            }
        )
    return out


def xla_trainer(model, optimizer, precision="fp32") -> Trainer:
    rt = backends.setup("xla", "none", precision)
    model = model.to(rt.device)
    # The optimizer is built on the moved parameters, as train.py does.
    return Trainer(
        model, rt, multilabel=False, mean=MEAN, std=STD, optimizer=optimizer(model.parameters())
    )


def lr_at(epoch: float) -> float:
    return 0.05 + 0.1 * epoch  # a different value at every update


def test_lr_per_update_and_no_recompilation():
    """SGD on XLA matches plain PyTorch on the CPU fed the schedule's lr at every step, and
    later epochs (new lr values every step) compile nothing."""
    steps = 4
    data = batches(steps, seed=1)
    reference = tiny_model()
    trainer = xla_trainer(tiny_model(), lambda p: torch.optim.SGD(p, lr=0.0))

    sgd = torch.optim.SGD(reference.parameters(), lr=0.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    losses = {}
    for epoch in range(3):
        before = compiles()
        losses[epoch] = trainer.train_one_epoch(
            data, epoch=epoch, steps=steps, start_step=0, lr_at=lr_at
        )
        if epoch > 0:
            assert compiles() == before, f"epoch {epoch} compiled new graphs"
        total = 0.0
        for step, batch in enumerate(data):
            sgd.param_groups[0]["lr"] = lr_at(epoch + step / steps)
            sgd.zero_grad()
            x = (batch["image"].float() / 255.0 - mean) / std
            loss = F.cross_entropy(reference(x), batch["target"])
            loss.backward()
            sgd.step()
            total += loss.item()
        assert losses[epoch] == pytest.approx(total / steps, rel=1e-5)
        assert trainer.optimizer.param_groups[0]["lr"] == lr_at(epoch + (steps - 1) / steps)
    for mine, theirs in zip(trainer.model.parameters(), reference.parameters()):
        torch.testing.assert_close(mine.cpu(), theirs.detach(), rtol=1e-5, atol=1e-5)


def test_bf16_keeps_fp32_master_weights():
    trainer = xla_trainer(tiny_model(), lambda p: torch.optim.Adam(p, lr=1e-3), "bf16")
    with trainer.rt.autocast():
        out = trainer.model(torch.zeros(2, 3, SIZE, SIZE, device=trainer.rt.device))
    assert out.dtype == torch.bfloat16  # autocast is on for the forward pass
    loss = trainer.train_one_epoch(
        batches(3, seed=2), epoch=0, steps=3, start_step=0, lr_at=lambda e: 1e-3
    )
    assert np.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())
    for state in trainer.optimizer.state.values():
        assert state["exp_avg"].dtype == torch.float32


def test_non_finite_loss_names_epoch_and_step():
    """A huge lr: every update would give weights beyond float32's range, so every step is
    skipped; steps count from the epoch's start step (a resumed epoch starts mid-way)."""
    trainer = xla_trainer(tiny_model(), lambda p: torch.optim.SGD(p, lr=0.0))
    with pytest.raises(NonFiniteLoss, match=r"gradients at epoch 2 steps 3 to 5"):
        trainer.train_one_epoch(
            batches(4, seed=3), epoch=2, steps=7, start_step=3, lr_at=lambda e: 1e38
        )


def everything(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Weights, BatchNorm statistics, optimizer state and moving average, on the CPU."""
    state = {f"model.{k}": v for k, v in trainer.model.state_dict().items()}
    state |= {f"ema.{k}": v for k, v in trainer.ema.module.state_dict().items()}
    state |= {f"opt.{k}": v for k, v in optimizer_tensors(trainer.optimizer).items()}
    return {k: v.detach().cpu().clone() for k, v in state.items()}


def conv_bn_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
        torch.nn.Linear(4 * (SIZE - 2) ** 2, CLASSES),
    )  # fmt: skip


def guarded_trainer(device: str, optimizer: str) -> Trainer:
    """A conv + BatchNorm model with the optimizer `train` builds and a moving average."""
    rt = backends.setup(device, "none")
    model = conv_bn_model().to(rt.device)
    return Trainer(
        model, rt, multilabel=False, mean=MEAN, std=STD, ema_decay=0.9,
        optimizer=create_optimizer(model, optimizer, 0.0),
    )  # fmt: skip


@pytest.mark.parametrize("device", ["xla", "cpu"])
def test_a_non_finite_step_changes_nothing_and_is_counted(device):
    """A NaN target makes the loss and the gradients NaN: that step leaves the weights,
    BatchNorm statistics, Adam's moments and step count and the moving average bitwise as they
    were, in the same compiled graph as a good step; three in a row stop training."""
    trainer = guarded_trainer(device, "adam")
    good, bad = batches(2, seed=5), batches(3, seed=6)
    for batch in bad:
        batch["target"][0, 0] = float("nan")
    lr = {"lr_at": lambda e: 1e-2, "start_step": 0}
    trainer.train_one_epoch(good, epoch=0, steps=2, **lr)
    before, graphs = everything(trainer), compiles()
    trainer.train_one_epoch(bad[:2], epoch=1, steps=2, **lr)  # two in a row: below 3
    assert trainer.nonfinite_steps() == 2
    assert compiles() == graphs  # a skipped step runs the graph of a good one
    after = everything(trainer)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items()), "a skipped step changed state"
    trainer.train_one_epoch(good[:1], epoch=2, steps=1, **lr)
    assert trainer.nonfinite_steps() == 0
    assert not torch.equal(everything(trainer)["model.0.weight"], before["model.0.weight"])
    with pytest.raises(NonFiniteLoss, match=r"at epoch 3 steps 0 to 2 \(3 in a row"):
        trainer.train_one_epoch(bad, epoch=3, steps=3, **lr)


@pytest.mark.parametrize(
    "device, optimizer", [("xla", "adam"), ("xla", "sgd"), ("cpu", "adamw"), ("cpu", "sgd")]
)
def test_finite_loss_with_a_nan_gradient_or_overflowing_weights_changes_nothing(device, optimizer):
    """Two ways a step fails with a finite loss: a NaN gradient (here from a hook) and an
    update that would take the weights past float32's range (lr 1e38). Both are skipped: the
    state stays bitwise as it was, for each optimizer `train` builds."""
    trainer = guarded_trainer(device, optimizer)
    good = batches(2, seed=5)
    trainer.train_one_epoch(good, epoch=0, steps=2, start_step=0, lr_at=lambda e: 1e-2)
    before = everything(trainer)
    trainer.train_one_epoch(good[:1], epoch=1, steps=1, start_step=0, lr_at=lambda e: 1e38)
    assert trainer.nonfinite_steps() == 1
    assert all(torch.equal(everything(trainer)[k], v) for k, v in before.items())
    weight = trainer.model[0].weight
    hook = weight.register_hook(lambda grad: grad * float("nan"))
    trainer.train_one_epoch(good[:1], epoch=2, steps=1, start_step=0, lr_at=lambda e: 1e-2)
    hook.remove()
    assert trainer.nonfinite_steps() == 1
    assert all(torch.equal(everything(trainer)[k], v) for k, v in before.items())
    trainer.train_one_epoch(good[:1], epoch=3, steps=1, start_step=0, lr_at=lambda e: 1e-2)
    assert trainer.nonfinite_steps() == 0
    assert not torch.equal(everything(trainer)["model.0.weight"], before["model.0.weight"])


def test_sync_free_adam_on_xla_trains_like_fused_adam_on_the_cpu_without_recompiling():
    """The optimizer `train` builds on XLA (torch_xla's sync-free Adam) against torch's fused
    Adam on the CPU, with a new lr every step: the same losses and weights, and nothing
    compiles after the first epoch."""
    trainers = {device: guarded_trainer(device, "adam") for device in ("xla", "cpu")}
    data = batches(3, seed=7)
    for epoch in range(3):
        graphs = compiles()
        losses = {
            device: trainer.train_one_epoch(
                data, epoch=epoch, steps=3, start_step=0, lr_at=lambda e: 1e-2 / (1 + e)
            )
            for device, trainer in trainers.items()
        }
        if epoch > 0:
            assert compiles() == graphs, f"epoch {epoch} compiled new graphs"
        assert losses["xla"] == pytest.approx(losses["cpu"], rel=1e-4)
    xla, cpu = (everything(trainers[d]) for d in ("xla", "cpu"))
    for key in ("model.0.weight", "model.3.weight", "ema.3.weight"):
        torch.testing.assert_close(xla[key], cpu[key], rtol=1e-4, atol=1e-5)


def test_the_guarded_step_dispatches_no_more_ops_than_the_bare_torch_xla_loop():
    """The host's cost per step, counted exactly (torch_xla's op counters): leaf_xla's step,
    non-finite guard included, against pytorch/xla's bare loop (forward, loss, backward,
    torch.optim.Adam, sync) on the same model. bench/host_cost.py does this for timm models."""
    import torch_xla
    import torch_xla.debug.metrics as met

    def ops() -> int:
        names = (n for n in met.counter_names() if n.startswith("xla::"))
        return sum(met.counter_value(n) or 0 for n in names)

    def deep_model() -> torch.nn.Module:  # parameters and buffers as a real net has them
        torch.manual_seed(0)
        blocks = [(torch.nn.Conv2d(3 if i == 0 else 8, 8, 3, padding=1), torch.nn.BatchNorm2d(8))
                  for i in range(12)]  # fmt: skip
        layers = [layer for block in blocks for layer in (*block, torch.nn.ReLU())]
        flat = torch.nn.Linear(8 * SIZE * SIZE, CLASSES)
        return torch.nn.Sequential(*layers, torch.nn.Flatten(), flat)

    data = batches(2, seed=8)
    rt = backends.setup("xla", "none")
    model = deep_model().to(rt.device)
    optimizer = create_optimizer(model, "adam", 0.0)
    trainer = Trainer(model, rt, multilabel=False, mean=MEAN, std=STD, optimizer=optimizer)
    for epoch in range(2):  # the first compiles
        counted = ops()
        trainer.train_one_epoch(data, epoch=epoch, steps=2, start_step=0, lr_at=lambda e: 1e-3)
    leaf = (ops() - counted) / 2

    device = torch_xla.device()
    model = deep_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        counted = ops()
        for batch in data:
            x, y = batch["image"].to(device), batch["target"].argmax(1).to(device)
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x.float() / 255), y).backward()
            optimizer.step()
            torch_xla.sync()
    bare = (ops() - counted) / 2
    print(f"ops per step: leaf_xla {leaf:.0f}, bare loop {bare:.0f}")
    assert leaf <= bare, f"leaf_xla's step dispatches {leaf:.0f} ops, the bare loop {bare:.0f}"


def test_evaluate_returns_every_sample_once_in_order():
    n, batch = 7, 4  # not a multiple: the last batch is padded and masked
    model = tiny_model()
    trainer = xla_trainer(tiny_model(), lambda p: torch.optim.SGD(p, lr=0.0))
    images = torch.randint(0, 256, (n, 3, SIZE, SIZE), generator=torch.Generator().manual_seed(4))
    targets = F.one_hot(torch.arange(n) % CLASSES, CLASSES).float()
    loader = []
    for keys in eval_batches(n, batch, 1, 0):
        index = torch.tensor([i for i, _ in keys])
        real = index < n
        safe = torch.where(real, index, 0)
        loader.append(
            {
                "image": torch.where(real.view(-1, 1, 1, 1), images[safe], 0).byte(),
                "target": targets[safe] * real.view(-1, 1),
                "index": torch.where(real, index, -1).int(),
                "mask": real.float(),
            }
        )
    probs, loss = trainer.evaluate(loader, n)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model((images.float() / 255.0 - mean) / std)
    np.testing.assert_allclose(probs, torch.softmax(logits, 1).numpy(), rtol=1e-5, atol=1e-6)
    assert loss == pytest.approx(float(F.cross_entropy(logits, targets)), rel=1e-5)


def test_mixup_cutmix_and_ema_compile_once_and_match_eager_pytorch():
    """Mixing and the moving average inside the compiled step on XLA: nothing compiles after
    the first epoch although every step draws another lambda and box (or none: --mix-prob),
    and the XLA run matches the same trainer on plain PyTorch (eager CPU) step for step."""
    height, width, steps = 4, 6, 4  # not square
    gen = torch.Generator().manual_seed(5)
    data = [
        {
            "image": torch.randint(0, 256, (BATCH, 3, height, width), generator=gen).byte(),
            "target": F.one_hot(
                torch.randint(0, CLASSES, (BATCH,), generator=gen), CLASSES
            ).float(),
            "index": torch.arange(BATCH, dtype=torch.int32),
            "mask": torch.ones(BATCH),
        }
        for _ in range(steps)
    ]
    mixing = MixSettings(mixup=0.4, cutmix=1.0, mix_prob=0.8, mixup_switch_prob=0.5)
    trainers, losses, first = {}, {}, {}
    for device in ("xla", "cpu"):
        rt = backends.setup(device, "none")
        torch.manual_seed(0)
        model = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(3 * height * width, CLASSES)
        ).to(rt.device)
        trainers[device] = Trainer(
            model,
            rt,
            multilabel=False,
            mean=MEAN,
            std=STD,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
            label_smoothing=0.1,
            seed=3,
            mixing=mixing,
            ema_decay=0.5,
        )
    for epoch in range(3):
        before = compiles()
        for device, trainer in trainers.items():
            losses[device] = trainer.train_one_epoch(
                data, epoch=epoch, steps=steps, start_step=0, lr_at=lr_at
            )
        if epoch > 0:
            assert compiles() == before, f"epoch {epoch} compiled new graphs"
        assert losses["xla"] == pytest.approx(losses["cpu"], rel=1e-5)
        first.setdefault("loss", losses["cpu"])
    xla, cpu = (trainers[d] for d in ("xla", "cpu"))
    for mine, theirs in zip(xla.ema.module.parameters(), cpu.ema.module.parameters()):
        torch.testing.assert_close(mine.cpu(), theirs, rtol=1e-5, atol=1e-5)
    # The average lags the weights: after 12 updates at decay 0.5 it is close to, not at, them.
    for averaged, current in zip(cpu.ema.module.parameters(), cpu.model.parameters()):
        assert not torch.equal(averaged, current)
    # Mixing changed the training: the same first epoch without it has another loss.
    rt = backends.setup("cpu", "none")
    torch.manual_seed(0)
    plain_model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * height * width, 4))
    plain = Trainer(
        plain_model,
        rt,
        multilabel=False,
        mean=MEAN,
        std=STD,
        optimizer=torch.optim.SGD(plain_model.parameters(), lr=0.0),
        label_smoothing=0.1,
    )
    loss = plain.train_one_epoch(data, epoch=0, steps=steps, start_step=0, lr_at=lr_at)
    assert abs(loss - first["loss"]) > 1e-3


def soft_batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    """`batches` with random probability rows as targets (distributions: softmax of noise)."""
    gen = torch.Generator().manual_seed(seed + 100)
    out = batches(n, seed)
    for batch in out:
        batch["target"] = torch.softmax(3 * torch.randn(BATCH, CLASSES, generator=gen), 1)
    return out


@pytest.mark.parametrize("multilabel", [False, True])
def test_soft_targets_loss_by_hand_and_no_new_graph(multilabel: bool) -> None:
    """Soft target rows train with the same compiled step as one-hot rows (same shape and
    dtype: nothing compiles), and the loss is the hand-written soft cross-entropy (softmax) or
    soft binary cross-entropy (sigmoid). lr 0: the weights stay those of the reference."""
    steps = 3
    rt = backends.setup("xla", "none", "fp32")
    model = tiny_model().to(rt.device)
    trainer = Trainer(
        model,
        rt,
        multilabel=multilabel,
        mean=MEAN,
        std=STD,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.0),
    )
    trainer.train_one_epoch(batches(steps, seed=5), epoch=0, steps=steps, start_step=0, lr_at=lr0)
    soft = soft_batches(steps, seed=6)
    before = compiles()
    loss = trainer.train_one_epoch(soft, epoch=1, steps=steps, start_step=0, lr_at=lr0)
    assert compiles() == before, "soft targets compiled another graph"

    reference = tiny_model()
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    expected = 0.0
    with torch.no_grad():
        for batch in soft:
            z = reference((batch["image"].float() / 255.0 - mean) / std)
            q = batch["target"]
            if multilabel:
                p = torch.sigmoid(z)
                per_image = -(q * torch.log(p) + (1 - q) * torch.log(1 - p)).mean(1)
            else:
                per_image = -(q * torch.log_softmax(z, 1)).sum(1)
            expected += float(per_image.mean())
    assert loss == pytest.approx(expected / steps, rel=1e-5)


def lr0(epoch: float) -> float:
    del epoch
    return 0.0


def test_an_optimizer_state_saved_on_one_device_trains_on_the_other():
    """A run resumed on another device loads the state another optimizer saved (XLA's
    sync-free Adam, torch's fused Adam): loading replaces the parameter groups' settings, and
    the step must still skip on its flag."""
    import torch_xla.core.xla_model as xm

    data = batches(2, seed=9)
    trainers = {device: guarded_trainer(device, "adam") for device in ("xla", "cpu")}
    for trainer in trainers.values():
        trainer.train_one_epoch(data, epoch=0, steps=2, start_step=0, lr_at=lambda e: 1e-2)
    for source, target in (("xla", "cpu"), ("cpu", "xla")):
        state = xm._maybe_convert_to_cpu(trainers[source].optimizer.state_dict())
        trainers[target].optimizer.load_state_dict(state)
        loss = trainers[target].train_one_epoch(
            data, epoch=1, steps=2, start_step=0, lr_at=lambda e: 1e-2
        )
        assert np.isfinite(loss) and trainers[target].nonfinite_steps() == 0
