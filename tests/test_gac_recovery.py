"""gac finds a corrupted timestep group and recovers from it (issue #13, item 4).

On a small random UNet2DModel, one unit's recorded training inputs of one timestep group are
replaced by Gaussian noise at 3x their scale while the recorded float outputs (the targets) stay:
a broken capture. Uniform reconstruction spends capacity on fitting noise to unrelated targets;
gac must give those samples clearly less weight (mean < 0.5x uniform) and end with a lower block
MSE on the clean validation set. Measured when this test was written (uniform: clean MSE 3.74e-3):

    gac as shipped                        corrupted weight 0.34x   clean MSE 1.67e-3
    validation term's sign flipped        4.21x                    1.28e-2
    both terms' signs flipped             4.21x                    1.28e-2
    validation term zeroed (matching only) 2.44x                   8.92e-3
    both terms zeroed (inert)             1.00x                    3.74e-3 (= uniform)

so a sign error or an inert update fails both assertions, and the matching term alone is no
quality signal (it also rewards samples that hurt every group alike).
"""
import copy

import pytest
import torch

from tgpq import QuantConfig
from tgpq.calibration import collect_calibration
from tgpq.calibration.calibrate import unit_problem
from tgpq.calibration.capture import UnitData
from tgpq.calibration.fake_quant import QuantLayer
from tgpq.calibration.gac import SampleWeighter
from tgpq.calibration.capture import main_output
from tgpq.calibration.reconstruct import block_output_mse, reconstruct_block

from conftest import make_small_unet

BAD_GROUP = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _run(problem, train, config, gac: bool):
    block = copy.deepcopy(problem.block)
    ctx = next(m.ctx for m in block.modules() if isinstance(m, QuantLayer))
    n = len(train)
    weighter = None
    if gac:
        weighter = SampleWeighter(block, ctx, train, problem.groups, problem.val, problem.val_groups,
                                  torch.zeros(n), config, main_output)
    reconstruct_block(block, ctx, train, problem.groups, torch.full((n,), 1.0 / n), config,
                      torch.Generator().manual_seed(config.seed), progress=False, refresh=weighter,
                      refresh_every=weighter.every if weighter else 1)
    mse = block_output_mse(block, ctx, problem.val, problem.val_groups, 64)
    w = weighter.weights if weighter else torch.full((n,), 1.0 / n)
    return mse, w, weighter


@pytest.mark.slow
def test_gac_downweights_a_corrupted_group_and_beats_uniform():
    from diffusers import DDIMScheduler

    unet = make_small_unet(seed=0)
    calib = collect_calibration(unet, DDIMScheduler(num_train_timesteps=1000), num_trajectories=8, num_steps=20,
                                interval=2, seed=0, batch_size=8, progress=False)
    config = QuantConfig(weight_bits=4, method="gac", iters=80, batch_size=16, seed=0)
    problem = unit_problem(unet, calib, config, "down_blocks.0.resnets.0")
    bad = problem.groups == BAD_GROUP
    assert int(bad.sum()) >= 8 and int((problem.val_groups == BAD_GROUP).sum()) >= 8
    # corrupt: the group's recorded block inputs become noise at 3x their scale; targets stay
    leaves = list(problem.train.leaves)
    x = leaves[0].clone()
    g = torch.Generator().manual_seed(123)
    x[bad] = torch.randn(int(bad.sum()), *x.shape[1:], generator=g) * 3 * float(x[~bad].std())
    leaves[0] = x
    train = UnitData(problem.train.treedef, leaves, problem.train.batched, problem.train.out)

    mse_uniform, _, _ = _run(problem, train, config, gac=False)
    mse_gac, w, weighter = _run(problem, train, config, gac=True)
    n = len(train)
    rel_bad = float(w[bad].mean() * n)
    rel_good = float(w[~bad].mean() * n)
    assert len(weighter.records) == 3
    assert rel_bad < 0.5, f"corrupted group's mean weight {rel_bad:.3f}x uniform (clean: {rel_good:.3f}x)"
    assert mse_gac < mse_uniform, f"clean validation MSE gac {mse_gac:.4e} vs uniform {mse_uniform:.4e}"
