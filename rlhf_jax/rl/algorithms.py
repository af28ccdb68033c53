"""The online RL algorithms as named presets of one :class:`Algorithm` record.

PPO and the GRPO family differ in a handful of choices, each a name in :mod:`rlhf_jax.registry` or a
number: the advantage estimator, the policy loss, how per-token losses aggregate, where the KL to the
reference acts (reward or loss) and with which estimator, the clip range, the group size, DAPO's
overlong filter and dynamic sampling. A preset fixes them as its paper does; every field can be
overridden from the CLI (``--algo grpo --algo-args.kl-estimator k2``).

=============  ==============================================================================================
preset         as published
=============  ==============================================================================================
``ppo``        GAE on a critic; KL (k1) in the per-token reward; clipped ratio; token mean
               (Ziegler et al. 2019; Ouyang et al. 2022; Huang et al. 2024)
``grpo``       group-normalised outcome advantages; no critic; k3 KL in the loss, β 0.04; per-sequence mean
               (Shao et al. 2024, DeepSeekMath, eq. 3–4)
``dr_grpo``    group mean-centred (no std); token sum over a constant length budget; no KL
               (Liu et al. 2025, "Understanding R1-Zero-Like Training")
``dapo``       GRPO advantages; clip-higher (0.2, 0.28); token mean; overlong filtering; dynamic sampling; no KL
               (Yu et al. 2025, DAPO)
``gspo``       GRPO advantages; sequence-level (length-normalised) ratio, clip 3e-4 / 4e-4; no KL
               (Zheng et al. 2025, GSPO)
``rloo``       leave-one-out baseline; KL (k1) in the reward, β 0.05; whole-sequence REINFORCE (token sum)
               (Ahmadian et al. 2024)
``reinforce_pp``  per-token KL (k1) in the reward, β 0.01; return-to-go; global advantage whitening; clip
               (Hu 2025, REINFORCE++)
=============  ==============================================================================================

On the KL in the loss: with samples from the current policy the gradient of ``E[k3]`` is that of
KL(π_ref ‖ π), not of KL(π ‖ π_ref); ``k2``'s is that of KL(π ‖ π_ref) (the same as k1 in the reward).
The one-step bandit (tests/test_bandit.py, notebooks) shows where each converges.
"""
from __future__ import annotations

import dataclasses

from rlhf_jax import registry


@dataclasses.dataclass(frozen=True)
class Algorithm:
    """Every choice that tells one online RL method from another (hashable: closed over by the jitted steps)."""

    advantage: str = "gae"
    """Advantage estimator (registry.ADVANTAGES: gae, grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline)."""
    policy_loss: str = "ppo_clip"
    """Policy loss (registry.POLICY_LOSSES: ppo_clip, gspo)."""
    aggregation: str = "token_mean"
    """How per-token losses reduce (registry.AGGREGATIONS)."""
    kl_placement: str = "reward"
    """Where the KL to the reference acts (registry.KL_PLACEMENTS: reward, loss, none)."""
    kl_estimator: str = "k1"
    """Per-token KL estimator (registry.KL_ESTIMATORS) in the reward or in the loss."""
    kl_coef: float = 0.1
    """β: the KL coefficient (initial value with an adaptive controller; reward placement only)."""
    clip_eps: float = 0.2
    """Ratio clip ε (lower side)."""
    clip_eps_high: float | None = None
    """Upper clip ε_high (DAPO's clip-higher); None: ε."""
    dual_clip: float | None = None
    """Dual-clip bound c > 1 on negative-advantage tokens (ppo_clip only); None: off."""
    samples_per_prompt: int = 1
    """Responses sampled per prompt (the group of the grouped estimators; ≥ 2 for those)."""
    vf_coef: float = 0.1
    """Value-loss weight (estimators with a critic)."""
    value_clip: float | None = 0.2
    """Value clip range (None: plain squared error)."""
    entropy_coef: float = 0.0
    """Entropy bonus."""
    gamma: float = 1.0
    """Discount (GAE, REINFORCE++)."""
    lam: float = 0.95
    """GAE λ."""
    overlong_filter: bool = False
    """Responses cut at the length limit (no EOS) drop out of the loss (DAPO §3.4)."""
    dynamic_sampling: bool = False
    """Keep sampling until the batch holds only groups whose scores differ (DAPO §3.2)."""

    def __post_init__(self):
        registry.ADVANTAGES.check(self.advantage, "--algo-args.advantage")
        registry.POLICY_LOSSES.check(self.policy_loss, "--algo-args.policy-loss")
        registry.AGGREGATIONS.check(self.aggregation, "--algo-args.aggregation")
        registry.KL_PLACEMENTS.check(self.kl_placement, "--algo-args.kl-placement")
        registry.KL_ESTIMATORS.check(self.kl_estimator, "--algo-args.kl-estimator")
        if self.samples_per_prompt < 1:
            raise ValueError(f"--algo-args.samples-per-prompt must be >= 1, got {self.samples_per_prompt}")
        if self.grouped and self.samples_per_prompt < 2:
            raise ValueError(f"advantage {self.advantage!r} compares the samples of one prompt: "
                             f"--algo-args.samples-per-prompt must be >= 2, got {self.samples_per_prompt}")
        if self.dynamic_sampling and not self.grouped:
            raise ValueError("--algo-args.dynamic-sampling filters groups: it needs a grouped advantage estimator")
        if self.dual_clip is not None and self.policy_loss != "ppo_clip":
            raise ValueError(f"--algo-args.dual-clip applies to ppo_clip only, not {self.policy_loss!r}")

    @property
    def needs_critic(self) -> bool:
        """The estimator reads values (GAE): a value head or a separate critic is trained."""
        return registry.ADVANTAGES[self.advantage].needs_critic

    @property
    def grouped(self) -> bool:
        return registry.ADVANTAGES[self.advantage].needs_groups

    @property
    def kl_in_reward(self) -> bool:
        return registry.KL_PLACEMENTS[self.kl_placement].in_reward

    @property
    def kl_in_loss(self) -> bool:
        return registry.KL_PLACEMENTS[self.kl_placement].in_loss

    @property
    def scoring_reads_policy_logps(self) -> bool:
        """Scoring a rollout needs the sampling policy's log-probs beyond the update's ratio: for the KL in the
        reward (the advantages read it) or for a critic's pass (values come from the same backbone pass)."""
        return self.kl_in_reward or self.needs_critic

    def describe(self) -> str:
        kl = ("no KL" if not (self.kl_in_reward or self.kl_in_loss) else
              f"KL {self.kl_estimator} in the {self.kl_placement}, β {self.kl_coef:g}")
        clip = f"clip {self.clip_eps:g}" + (f"/{self.clip_eps_high:g}" if self.clip_eps_high is not None else "")
        extras = [x for x, on in (("overlong filter", self.overlong_filter), ("dynamic sampling", self.dynamic_sampling))
                  if on]
        return ", ".join([f"advantage {self.advantage}" + (" (critic)" if self.needs_critic else ""),
                          f"{self.policy_loss} ({clip})", f"aggregation {self.aggregation}", kl,
                          f"{self.samples_per_prompt} sample(s) per prompt", *extras])


PRESETS: dict[str, Algorithm] = {
    "ppo": Algorithm(),
    "grpo": Algorithm(advantage="grpo", aggregation="seq_mean_token_mean", kl_placement="loss", kl_estimator="k3",
                      kl_coef=0.04, samples_per_prompt=4),
    "dr_grpo": Algorithm(advantage="dr_grpo", aggregation="seq_mean_token_sum_norm", kl_placement="none",
                         kl_coef=0.0, samples_per_prompt=4),
    "dapo": Algorithm(advantage="grpo", aggregation="token_mean", kl_placement="none", kl_coef=0.0, clip_eps=0.2,
                      clip_eps_high=0.28, samples_per_prompt=4, overlong_filter=True, dynamic_sampling=True),
    "gspo": Algorithm(advantage="grpo", policy_loss="gspo", aggregation="seq_mean_token_mean", kl_placement="none",
                      kl_coef=0.0, clip_eps=3e-4, clip_eps_high=4e-4, samples_per_prompt=4),
    "rloo": Algorithm(advantage="rloo", aggregation="seq_mean_token_sum", kl_placement="reward", kl_estimator="k1",
                      kl_coef=0.05, samples_per_prompt=4),
    "reinforce_pp": Algorithm(advantage="reinforce_pp", aggregation="token_mean", kl_placement="reward",
                              kl_estimator="k1", kl_coef=0.01),
}
"""The published settings of each method (see the module docstring)."""


@dataclasses.dataclass(frozen=True)
class AlgorithmArgs:
    """Overrides of the preset's fields (None: the preset's value). Same meaning as :class:`Algorithm`'s."""

    advantage: str | None = None
    policy_loss: str | None = None
    aggregation: str | None = None
    kl_placement: str | None = None
    kl_estimator: str | None = None
    kl_coef: float | None = None
    clip_eps: float | None = None
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    samples_per_prompt: int | None = None
    vf_coef: float | None = None
    value_clip: float | None = None
    entropy_coef: float | None = None
    gamma: float | None = None
    lam: float | None = None
    overlong_filter: bool | None = None
    dynamic_sampling: bool | None = None


def resolve(name: str, overrides: AlgorithmArgs = AlgorithmArgs()) -> Algorithm:
    """The preset ``name`` with every non-None field of ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"--algo {name!r} is not a known algorithm; choose one of {', '.join(PRESETS)}")
    given = {f.name: getattr(overrides, f.name) for f in dataclasses.fields(overrides)
             if getattr(overrides, f.name) is not None}
    return dataclasses.replace(PRESETS[name], **given)
