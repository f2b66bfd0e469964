"""Learning-rate schedules (cosine, poly, step) step for step against mmengine's own schedulers, and the
paper presets on mmseg's and mmdet's published schedules."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from mmengine.optim.scheduler import CosineAnnealingLR, LinearLR, MultiStepLR, PolyLR

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.config.stage import OptimConfig, StageConfig
from rmoe_platform.stage.worker.optim import build_schedule

ROOT = Path(__file__).resolve().parents[1]
LR, TOTAL = 6e-5, 160


def curve(make: Callable[[torch.optim.Optimizer], list], steps: int = TOTAL) -> list[float]:
    """The learning rate of each training step, the schedulers stepped after the optimizer as in training."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=LR)
    schedulers = make(optimizer)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        for scheduler in schedulers:
            scheduler.step()
    return out


def ours(optim: OptimConfig, milestones: tuple[int, ...] = ()) -> list[float]:
    return curve(lambda opt: [build_schedule(opt, optim, TOTAL, milestones)])


CASES = {
    "poly (mmseg's ADE20K, scaled)": (
        OptimConfig(lr=LR, warmup_steps=15, warmup_start_factor=1e-6, schedule="poly", power=1.0),
        lambda opt: [
            LinearLR(opt, start_factor=1e-6, by_epoch=False, begin=0, end=15),
            PolyLR(opt, eta_min=0.0, power=1.0, by_epoch=False, begin=15, end=TOTAL),
        ],
    ),
    "poly 0.9 to a floor": (
        OptimConfig(lr=LR, warmup_steps=10, warmup_start_factor=0.1, schedule="poly", power=0.9, min_lr_ratio=0.01),
        lambda opt: [
            LinearLR(opt, start_factor=0.1, by_epoch=False, begin=0, end=10),
            PolyLR(opt, eta_min=0.01 * LR, power=0.9, by_epoch=False, begin=10, end=TOTAL),
        ],
    ),
    "step (mmdet's 1x, scaled)": (
        OptimConfig(lr=LR, warmup_steps=50, warmup_start_factor=0.001, schedule="step", milestones=(80, 110)),
        lambda opt: [
            LinearLR(opt, start_factor=0.001, by_epoch=False, begin=0, end=50),
            MultiStepLR(opt, milestones=[80, 110], gamma=0.1, by_epoch=False, begin=0, end=TOTAL),
        ],
    ),
    "cosine to a floor": (
        OptimConfig(lr=LR, warmup_steps=20, warmup_start_factor=0.01, schedule="cosine", min_lr_ratio=0.05),
        lambda opt: [
            LinearLR(opt, start_factor=0.01, by_epoch=False, begin=0, end=20),
            CosineAnnealingLR(opt, T_max=TOTAL - 20, eta_min=0.05 * LR, by_epoch=False, begin=20, end=TOTAL),
        ],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_schedule_follows_mmengine_step_for_step(case: str) -> None:
    optim, mmengine = CASES[case]
    milestones = optim.milestones
    expected, got = curve(mmengine), ours(optim, milestones)
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64))
    assert max(got) == pytest.approx(LR) and min(got) < 0.2 * LR, "the curve really warms up and decays"


def test_the_original_warmup_and_cosine_are_unchanged() -> None:
    """Without warmup_start_factor the ramp is (step + 1) / warmup_steps, then the same cosine."""
    got = ours(OptimConfig(lr=LR, warmup_steps=10))
    assert got[:3] == pytest.approx([LR * 0.1, LR * 0.2, LR * 0.3])
    expected = curve(lambda opt: [CosineAnnealingLR(opt, T_max=TOTAL - 10, by_epoch=False, begin=10, end=TOTAL)])
    assert got[10:] == pytest.approx(expected[10:], rel=1e-9)


def test_milestones_count_in_the_budget_unit() -> None:
    base = {"name": "s", "data": {"uri": "d"}, "batch_size": 8, "optim": {"schedule": "step", "milestones": [8, 11]}}
    epochs = StageConfig.from_dict({**base, "budget": {"epochs": 12}})
    steps = StageConfig.from_dict({**base, "budget": {"steps": 12}})
    assert epochs.milestone_steps(num_train=80) == (80, 110)  # 10 steps an epoch
    assert steps.milestone_steps(num_train=80) == (8, 11)


@pytest.mark.parametrize(
    ("optim", "message"),
    [
        ({"schedule": "linear"}, "schedule: unknown 'linear'"),
        ({"schedule": "step"}, "schedule: step needs milestones"),
        ({"schedule": "step", "milestones": [11, 8]}, "milestones must be increasing"),
        ({"milestones": [8]}, "milestones belong to schedule: step"),
        ({"schedule": "poly", "power": 0}, "power must be > 0"),
        ({"warmup_start_factor": 0}, "warmup_start_factor must be in"),
    ],
)
def test_bad_schedules_name_the_field(optim: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"stage\.optim\.{message}"):
        StageConfig.from_dict({"name": "s", "data": {"uri": "d"}, "optim": optim})


def test_paper_presets_use_the_published_schedules() -> None:
    ade = ExperimentConfig.load(ROOT / "configs" / "paper" / "ade20k_upernet_swin_t.yaml").downstream
    assert (ade.optim.schedule, ade.optim.power, ade.optim.warmup_steps, ade.optim.warmup_start_factor) == (
        "poly",
        1.0,
        1500,
        1e-6,
    )
    assert ade.budget.steps == 160_000 and ade.optim.lr == 6e-5
    for preset, milestones in (("coco_mask_rcnn_swin_t_1x", (8, 11)), ("coco_mask_rcnn_swin_t_3x", (27, 33))):
        coco = ExperimentConfig.load(ROOT / "configs" / "paper" / f"{preset}.yaml").downstream
        assert (coco.optim.schedule, coco.optim.milestones, coco.optim.gamma) == ("step", milestones, 0.1)
        assert (coco.optim.warmup_steps, coco.optim.warmup_start_factor, coco.optim.lr) == (500, 0.001, 1e-4)
