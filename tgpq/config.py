"""The quantization recipe: one small dataclass, validated on construction."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

SUPPORTED_WEIGHT_BITS = (4, 8)
SUPPORTED_ACT_BITS = (8,)
SUPPORTED_METHODS = ("gac", "uniform", "rtn")

# Layers kept in floating point by default (Q-Diffusion keeps the first and last conv in float;
# the time-embedding MLP sees only a finite set of inputs and is cheap).
DEFAULT_EXCLUDE = ("conv_in", "conv_out", "time_embedding", "class_embedding")


@dataclass
class QuantConfig:
    """What to quantize and how to calibrate it.

    Numerics (paper-agnostic, fixed by the kernels):
      * weights: symmetric, per output channel, ``weight_bits`` in {4, 8}, integer range
        ``[-(2^(b-1)-1), 2^(b-1)-1]`` (so int4 uses [-7, 7], int8 [-127, 127]);
        scale chosen by an MSE search over clipping ratios (``weight_clip_grid`` candidates).
      * activations: symmetric int8 in [-127, 127], one step size per timestep group,
        round-half-to-even of ``x * (1 / a_scale[g])`` computed in float32.

    Calibration (section 1 of DESIGN.md). Paper defaults are marked "paper"; everything else is
    "our choice" because the paper (as read from summaries) is silent:
      * ``num_groups`` = 5 contiguous timestep groups ("tasks"): paper.
      * ``tau`` = 1.0 softmax temperature of the sample weights ``w = softmax(s / tau)`` over the
        whole training set (the whole set, not the mini-batch: our choice): paper.
      * ``val_fraction`` = 0.05 validation set size relative to the training set: paper. It is
        ``collect_calibration``'s default too, which also draws at least 8 validation samples per
        timestep group (``min_val_per_group``, our choice; e.g. 2 trajectories = 40 samples for 16
        trajectories of 100 steps): with 2 per group the learned weights were noise.
      * ``gm_lambda`` = 1.0 weight of the gradient-matching term: paper ("as written"); our term is
        the mean cosine of the groups' logit-space gradients (``tgpq.calibration.gac``), not the
        paper's inner product on ``w``, which vanishes like eta^2. 0 = the ablation without it.
      * ``iters``, ``lr_*`` (``lr_adaround`` 3e-2 instead of BRECQ's 1e-3, see below),
        ``batch_size``, ``adaround_*``: our choice (small defaults so a CPU run is minutes).

    gac, our choices (the paper gives none of these; ``tgpq/calibration/gac.py`` has the equations):
      * look-ahead ``theta*``: one step of the reconstruction's own optimiser (Adam, its current
        moments, the full-set weighted gradient ``g(w)`` as the step's gradient), with a step size per
        parameter kind: ``lookahead_lr_alpha`` for AdaRound ``alpha`` (None = ``lr_adaround``) and
        ``lookahead_lr_act`` for the activation step sizes (default 0: the weights are refreshed
        during the AdaRound phase, where reconstruction keeps the step sizes fixed; ``lr_act_scale``
        puts them in). On the reference model ``L_t(theta*) / L_t(theta) <= 1.5`` on every block
        (tests/test_gac_reference.py); one plain SGD step of 1e-2 on both kinds gave 100-3,600x.
      * the weights' gradient ``G_t = dL_t(theta*)/dw`` is taken to first order in the step
        (validation gradients at ``theta``), from per-sample gradients (``torch.func.vmap``).
      * logit update: one exponentiated-gradient step per refresh, normalised to an RMS of
        ``lr_sample_logits`` (0.5) over the samples and clipped at 3x that, taken in ``weight_steps``
        (1) equal sub-steps.
      * refreshes: every ``weight_update_every`` AdaRound iterations (None = ``max(1, iters // 4)``:
        at 25 %, 50 % and 75 % of the phase), on the whole training and validation sets; weights held
        fixed in between and during the step-size phase; none at iteration 0, where the soft weights
        still equal the float weights and Adam has no moments.
      * ``weights_carry_over`` (False): every block starts from uniform weights (carrying the logits
        over would add every earlier block's steps to the next block's).
    """

    weight_bits: int = 8
    act_bits: int = 8
    method: str = "gac"
    num_groups: int = 5
    num_train_timesteps: int = 1000
    exclude: tuple = DEFAULT_EXCLUDE
    weight_clip_grid: int = 40  # our choice: candidates alpha in (0.5, 1] for the MSE search
    act_quantile: float = 1.0  # our choice: 1.0 = plain min/max (EMA 0.95) initialisation
    act_ema_momentum: float = 0.95  # DESIGN.md: running min/max EMA momentum
    # Reconstruction (uniform / gac)
    iters: int = 200  # our choice: optimisation steps per block
    batch_size: int = 32  # our choice
    # our choice: BRECQ's 1e-3 assumes ~20k iterations; with a few hundred, 1e-3 left some blocks
    # worse than RTN in our tests, 3e-2 lowered every block below RTN (tests/test_calibration.py)
    lr_adaround: float = 3e-2
    lr_act_scale: float = 4e-5  # Q-Diffusion default for LSQ step sizes
    learn_act_scale: bool = True  # our choice: LSQ step-size phase after the rounding
    adaround_reg_weight: float = 0.01  # BRECQ default
    adaround_beta: tuple = (20.0, 2.0)  # BRECQ default annealing range
    adaround_warmup: float = 0.2  # BRECQ default
    # Gradient-aligned calibration (gac)
    tau: float = 1.0  # paper
    val_fraction: float = 0.05  # paper
    gm_lambda: float = 1.0  # paper
    lookahead_lr_alpha: float | None = None  # our choice: look-ahead step on alpha; None = lr_adaround
    lookahead_lr_act: float = 0.0  # our choice: look-ahead step on act step sizes; 0 = left out
    lr_sample_logits: float = 0.5  # our choice: RMS change of the log-weights per refresh
    weight_steps: int = 1  # our choice: sub-steps of each refresh's logit update
    weight_update_every: int | None = None  # our choice: AdaRound iterations per refresh; None = iters // 4
    weights_carry_over: bool = False  # our choice: every block starts from uniform weights
    # Where a block's reconstruction inputs come from: "quantized" (the model with every earlier block
    # already quantized, so a block learns to correct the error it receives; BRECQ's / Q-Diffusion's
    # asymmetric reconstruction) or "fp" (the float model). Targets are FP outputs either way. Our
    # choice, measured on the reference model at W4A8 (uniform, 80 samples, 30 iters): eps-MSE vs FP
    # 1.60e-3 (quantized) vs 1.96e-3 (fp) vs 2.31e-3 (rtn); PSNR vs FP 23.8 / 22.4 / 21.9 dB.
    block_inputs: str = "quantized"
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.weight_bits not in SUPPORTED_WEIGHT_BITS:
            raise ValueError(
                f"weight_bits={self.weight_bits!r} is not supported: weights can be quantized to "
                f"{' or '.join(map(str, SUPPORTED_WEIGHT_BITS))} bits"
            )
        if self.act_bits not in SUPPORTED_ACT_BITS:
            raise ValueError(
                f"act_bits={self.act_bits!r} is not supported: activations are quantized to 8 bits "
                f"(int8 kernels); use act_bits=8"
            )
        if self.method not in SUPPORTED_METHODS:
            raise ValueError(f"method={self.method!r} is unknown: choose one of {SUPPORTED_METHODS}")
        if not (1 <= self.num_groups <= self.num_train_timesteps):
            raise ValueError(
                f"num_groups={self.num_groups} must be between 1 and num_train_timesteps="
                f"{self.num_train_timesteps}"
            )
        if self.block_inputs not in ("fp", "quantized"):
            raise ValueError(f"block_inputs={self.block_inputs!r} is unknown: choose 'fp' or 'quantized'")
        if not self.tau > 0:
            raise ValueError(f"tau={self.tau} must be positive")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not self.gm_lambda >= 0:
            raise ValueError(f"gm_lambda={self.gm_lambda} must be >= 0 (0 switches the matching term off)")
        if self.lookahead_lr_alpha is not None and not self.lookahead_lr_alpha > 0:
            raise ValueError(f"lookahead_lr_alpha={self.lookahead_lr_alpha} must be positive (or None: lr_adaround)")
        if not self.lookahead_lr_act >= 0:
            raise ValueError(f"lookahead_lr_act={self.lookahead_lr_act} must be >= 0 (0 leaves step sizes out)")
        if not self.lr_sample_logits >= 0:
            raise ValueError(f"lr_sample_logits={self.lr_sample_logits} must be >= 0")
        if not (isinstance(self.weight_steps, int) and self.weight_steps >= 1):
            raise ValueError(f"weight_steps={self.weight_steps!r} must be an integer >= 1")
        if self.weight_update_every is not None and not (
                isinstance(self.weight_update_every, int) and self.weight_update_every >= 1):
            raise ValueError(f"weight_update_every={self.weight_update_every!r} must be an integer >= 1 "
                             f"(or None: iters // 4)")
        self.exclude = tuple(self.exclude)
        self.adaround_beta = tuple(self.adaround_beta)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown QuantConfig fields: {sorted(unknown)}")
        return cls(**d)


def parse_bits(spec: str) -> tuple[int, int]:
    """Parse a CLI bit spec like ``"W4A8"`` (case-insensitive) into ``(weight_bits, act_bits)``."""
    s = spec.strip().upper()
    if not (s.startswith("W") and "A" in s):
        raise ValueError(f"bad bit spec {spec!r}: expected the form W<bits>A<bits>, e.g. W8A8 or W4A8")
    w, a = s[1:].split("A", 1)
    try:
        wb, ab = int(w), int(a)
    except ValueError:
        raise ValueError(f"bad bit spec {spec!r}: expected the form W<bits>A<bits>, e.g. W8A8 or W4A8") from None
    QuantConfig(weight_bits=wb, act_bits=ab)  # validates
    return wb, ab
