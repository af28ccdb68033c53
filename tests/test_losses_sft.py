"""SFT cross-entropy (with z-loss and label smoothing) against a NumPy loop."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import losses
from rlhf_jax.metrics import to_floats

RNG = np.random.default_rng(1)
B, T, V = 3, 5, 7
LOGITS = (RNG.normal(size=(B, T, V)) * 2).astype(np.float32)
TARGETS = RNG.integers(0, V, size=(B, T))
MASK = np.array([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1]], np.float32)  # completion-only masks

loss_fn = jax.jit(losses.sft_loss, static_argnames=("z_loss", "label_smoothing"))


def _oracle(logits, targets, mask, z_coef, eps):
    total, count, correct, nll_total = 0.0, 0.0, 0.0, 0.0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1]):
            if not mask[b, t]:
                continue
            z = logits[b, t].astype(np.float64)
            log_z = np.log(np.sum(np.exp(z)))
            logp = z - log_z
            nll = -logp[targets[b, t]]
            total += (1 - eps) * nll + eps * (-logp.mean()) + z_coef * log_z**2
            nll_total += nll
            correct += float(np.argmax(z) == targets[b, t])
            count += 1
    return total / count, nll_total / count, correct / count


@pytest.mark.parametrize("z_coef,eps", [(0.0, 0.0), (1e-2, 0.0), (0.0, 0.1), (1e-2, 0.2)])
def test_sft_loss_matches_loop(z_coef, eps):
    loss, metrics = loss_fn(LOGITS, TARGETS, MASK, z_loss=z_coef, label_smoothing=eps)
    want, want_nll, want_acc = _oracle(LOGITS, TARGETS, MASK, z_coef, eps)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    m = to_floats(metrics)
    np.testing.assert_allclose(m["sft/loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["sft/nll"], want_nll, rtol=1e-5)
    np.testing.assert_allclose(m["sft/accuracy"], want_acc, rtol=1e-6)
    assert m["sft/num_tokens"] == MASK.sum()


def test_label_smoothing_equals_optax_smoothed_targets():
    import optax

    eps = 0.1
    onehot = jax.nn.one_hot(TARGETS, V)
    per_token = optax.softmax_cross_entropy(LOGITS, optax.smooth_labels(onehot, eps))
    want = float(jnp.sum(per_token * MASK) / MASK.sum())
    np.testing.assert_allclose(loss_fn(LOGITS, TARGETS, MASK, label_smoothing=eps)[0], want, rtol=1e-5)


def test_gradient_is_softmax_minus_onehot_over_token_count():
    grad = jax.grad(lambda z: loss_fn(z, TARGETS, MASK)[0])(LOGITS)
    probs = np.exp(LOGITS - LOGITS.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = (probs - np.eye(V)[TARGETS]) * MASK[..., None] / MASK.sum()
    np.testing.assert_allclose(grad, want, rtol=1e-4, atol=1e-6)


def test_padding_does_not_change_loss():
    logits_pad = np.concatenate([LOGITS, RNG.normal(size=(B, 4, V)).astype(np.float32) * 50], axis=1)
    targets_pad = np.concatenate([TARGETS, RNG.integers(0, V, size=(B, 4))], axis=1)
    mask_pad = np.concatenate([MASK, np.zeros((B, 4), np.float32)], axis=1)
    a = to_floats(loss_fn(LOGITS, TARGETS, MASK, z_loss=1e-3)[1])
    b = to_floats(loss_fn(logits_pad, targets_pad, mask_pad, z_loss=1e-3)[1])
    for k in ("sft/loss", "sft/accuracy", "sft/z_loss", "sft/num_tokens"):
        np.testing.assert_allclose(a[k], b[k], rtol=1e-6)


def test_empty_mask_gives_zero_loss_and_finite_grad():
    zero = np.zeros_like(MASK)
    loss, grad = jax.value_and_grad(lambda z: loss_fn(z, TARGETS, zero)[0])(LOGITS)
    assert float(loss) == 0.0 and np.all(np.isfinite(grad)) and np.all(grad == 0)


class JitTest(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_jit_equals_no_jit(self):
        fn = self.variant(lambda z, y, m: losses.sft_loss(z, y, m, z_loss=1e-2, label_smoothing=0.1)[0])
        np.testing.assert_allclose(fn(LOGITS, TARGETS, MASK), _oracle(LOGITS, TARGETS, MASK, 1e-2, 0.1)[0], rtol=1e-5)
