"""DPO family (DPO, cDPO, robust DPO, IPO, SimPO) and KTO against NumPy loops of the papers' formulas."""
import math

import chex
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rlhf_jax import losses
from rlhf_jax.metrics import to_floats

B = 5
RNG = np.random.default_rng(4)
PC, PR, RC, RR = (RNG.normal(-20, 3, size=B).astype(np.float32) for _ in range(4))
LEN_C = np.array([10, 3, 7, 20, 5], np.float32)
LEN_R = np.array([4, 12, 7, 9, 30], np.float32)

dpo = jax.jit(losses.dpo_loss, static_argnames=("beta", "variant", "label_smoothing", "simpo_gamma", "nll_coef"))


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def _dpo_family_loop(variant, beta, eps, gamma):
    out = []
    for i in range(B):
        h = (PC[i] - RC[i]) - (PR[i] - RR[i])
        if variant == "dpo":  # Rafailov et al. 2023 eq. 7
            out.append(-_log_sigmoid(beta * h))
        elif variant == "cdpo":  # Mitchell 2023
            out.append(-(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h))
        elif variant == "robust":  # Chowdhury et al. 2024
            out.append(((1 - eps) * -_log_sigmoid(beta * h) - eps * -_log_sigmoid(-beta * h)) / (1 - 2 * eps))
        elif variant == "ipo":  # Azar et al. 2023
            out.append((h - 1 / (2 * beta)) ** 2)
        elif variant == "simpo":  # Meng et al. 2024
            out.append(-_log_sigmoid(beta / LEN_C[i] * PC[i] - beta / LEN_R[i] * PR[i] - gamma))
    return float(np.mean(out))


@pytest.mark.parametrize(
    "variant,beta,eps,gamma",
    [("dpo", 0.1, 0.0, 0.0), ("dpo", 0.5, 0.0, 0.0), ("cdpo", 0.1, 0.1, 0.0), ("robust", 0.2, 0.2, 0.0), ("ipo", 0.1, 0.0, 0.0),
     ("ipo", 1.0, 0.0, 0.0), ("simpo", 2.0, 0.0, 1.0)],
)
def test_dpo_family_matches_loop(variant, beta, eps, gamma):
    loss, metrics = dpo(PC, PR, RC, RR, beta=beta, variant=variant, label_smoothing=eps, simpo_gamma=gamma,
                        chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    np.testing.assert_allclose(loss, _dpo_family_loop(variant, beta, eps, gamma), rtol=1e-5)
    m = to_floats(metrics)
    if variant == "simpo":
        chosen, rejected = beta * PC / LEN_C, beta * PR / LEN_R
    else:
        chosen, rejected = beta * (PC - RC), beta * (PR - RR)
    np.testing.assert_allclose(m["dpo/chosen_reward"], chosen.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["dpo/rejected_reward"], rejected.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["dpo/margin"], (chosen - rejected).mean(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["dpo/accuracy"], (chosen > rejected).mean(), rtol=1e-6)


@pytest.mark.parametrize("alpha", [0.5, 2.0])
def test_rpo_adds_the_chosen_per_token_nll(alpha):
    """RPO (Pang et al. 2024, eq. 2): DPO + α · (−log π(y_w) / |y_w|), averaged over pairs."""
    loss, metrics = dpo(PC, PR, RC, RR, beta=0.1, nll_coef=alpha, chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)
    nll = [-PC[i] / LEN_C[i] for i in range(B)]
    np.testing.assert_allclose(loss, _dpo_family_loop("dpo", 0.1, 0.0, 0.0) + alpha * float(np.mean(nll)), rtol=1e-5)
    np.testing.assert_allclose(to_floats(metrics)["dpo/chosen_nll"], np.mean(nll), rtol=1e-5)
    # the NLL term's gradient raises the chosen log-prob (pulls π(y_w) up), by α / |y_w| per pair
    g_with = jax.grad(lambda pc: losses.dpo_loss(pc, PR, RC, RR, beta=0.1, nll_coef=alpha, chosen_lengths_B=LEN_C)[0])(PC)
    g_without = jax.grad(lambda pc: losses.dpo_loss(pc, PR, RC, RR, beta=0.1)[0])(PC)
    np.testing.assert_allclose(g_with - g_without, -alpha / LEN_C / B, rtol=1e-5)
    with pytest.raises(ValueError, match="nll_coef needs chosen_lengths_B"):
        losses.dpo_loss(PC, PR, RC, RR, nll_coef=alpha)


def test_simpo_ignores_reference_and_dpo_variants_dict():
    a = dpo(PC, PR, None, None, beta=2.0, variant="simpo", chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)[0]
    b = dpo(PC, PR, RC, RR, beta=2.0, variant="simpo", chosen_lengths_B=LEN_C, rejected_lengths_B=LEN_R)[0]
    np.testing.assert_allclose(a, b)
    assert set(losses.DPO_VARIANTS) == {"dpo", "cdpo", "robust", "ipo", "simpo"}
    np.testing.assert_allclose(losses.DPO_VARIANTS["ipo"](PC, PR, RC, RR, beta=0.3)[0], _dpo_family_loop("ipo", 0.3, 0, 0), rtol=1e-5)
    with pytest.raises(ValueError, match="reference"):
        losses.dpo_loss(PC, PR, None, None, variant="dpo")
    with pytest.raises(ValueError, match="unknown DPO variant"):
        losses.dpo_loss(PC, PR, RC, RR, variant="hinge")
    with pytest.raises(ValueError, match="robust"):
        losses.dpo_loss(PC, PR, RC, RR, variant="robust", label_smoothing=0.5)


@settings(max_examples=25, deadline=None)
@given(
    chosen=arrays(np.float32, (B,), elements=st.floats(-200, -1, width=32)),
    rejected=arrays(np.float32, (B,), elements=st.floats(-200, -1, width=32)),
    beta=st.sampled_from([0.05, 0.1, 0.5]),
)
def test_dpo_loss_is_log2_when_policy_equals_reference(chosen, rejected, beta):
    loss, metrics = dpo(chosen, rejected, chosen, rejected, beta=beta)
    np.testing.assert_allclose(loss, math.log(2), rtol=1e-6)
    assert to_floats(metrics)["dpo/accuracy"] == 0.0


def test_dpo_gradient_matches_paper_eq():
    """∇ wrt log π(y_w) of the DPO loss is −β σ(−β h) / B (Rafailov et al. 2023 §4, "What does the DPO update do?")."""
    beta = 0.3
    grad = jax.grad(lambda pc: dpo(pc, PR, RC, RR, beta=beta)[0])(PC)
    h = (PC - RC) - (PR - RR)
    np.testing.assert_allclose(grad, -beta / (1 + np.exp(beta * h)) / B, rtol=1e-4)


# KTO ---------------------------------------------------------------------------------------------
KP, KR = RNG.normal(-20, 3, size=B).astype(np.float32), RNG.normal(-20, 3, size=B).astype(np.float32)
KL_P, KL_R = RNG.normal(-25, 1, size=B).astype(np.float32), RNG.normal(-26, 1, size=B).astype(np.float32)
DESIRABLE = np.array([1, 0, 1, 1, 0], np.float32)
kto = jax.jit(losses.kto_loss, static_argnames=("beta", "desirable_weight", "undesirable_weight"))


def _kto_loop(kl_p, kl_r, beta, wd, wu):
    """Ethayarajh et al. 2024 §4: mean of λ_y − v(x, y), z0 = max(0, mean KL term)."""
    z0 = max(0.0, float(np.mean(kl_p.astype(np.float64) - kl_r)))
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    out = []
    for i in range(B):
        r = float(KP[i]) - float(KR[i])
        if DESIRABLE[i]:
            out.append(wd - wd * sig(beta * (r - z0)))
        else:
            out.append(wu - wu * sig(beta * (z0 - r)))
    return float(np.mean(out)), z0


@pytest.mark.parametrize("beta,wd,wu,shift", [(0.1, 1.0, 1.0, 0.0), (0.5, 1.0, 1.33, 0.0), (0.1, 2.0, 0.5, -5.0)])
def test_kto_matches_loop(beta, wd, wu, shift):
    kl_p = KL_P + shift  # shift −5 makes the batch KL estimate negative: z0 is clamped to 0
    loss, metrics = kto(KP, KR, kl_p, KL_R, DESIRABLE, beta=beta, desirable_weight=wd, undesirable_weight=wu)
    want, z0 = _kto_loop(kl_p, KL_R, beta, wd, wu)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    m = to_floats(metrics)
    np.testing.assert_allclose(m["kto/kl"], z0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(m["kto/chosen_reward"], (beta * (KP - KR))[DESIRABLE > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(m["kto/rejected_reward"], (beta * (KP - KR))[DESIRABLE == 0].mean(), rtol=1e-5)


def test_kto_reference_point_carries_no_gradient():
    grad = jax.grad(lambda kp: kto(KP, KR, kp, KL_R, DESIRABLE)[0])(KL_P)
    assert np.all(grad == 0.0)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(lambda a, b, c, d: losses.dpo_loss(a, b, c, d, beta=0.2, variant="robust", label_smoothing=0.1)[0])
        np.testing.assert_allclose(fn(PC, PR, RC, RR), _dpo_family_loop("robust", 0.2, 0.1, 0), rtol=1e-5)
