"""10-fold verification accuracy and TAR@FAR against brute-force NumPy computations."""
import numpy as np
import pytest

from lafs_jax.eval import roc, verification


def _brute_force_10fold(emb1, emb2, issame, nfolds=10):
    """The §4.4 protocol written out with Python loops and array_split folds (no sklearn)."""
    e1 = emb1 / np.linalg.norm(emb1, axis=1, keepdims=True)
    e2 = emb2 / np.linalg.norm(emb2, axis=1, keepdims=True)
    dist = ((e1 - e2) ** 2).sum(1)
    thresholds = [i / 100.0 for i in range(400)]
    folds = np.array_split(np.arange(len(issame)), nfolds)

    def acc(idx, t):
        return np.mean([(dist[i] < t) == issame[i] for i in idx])

    accs, thrs = [], []
    for k in range(nfolds):
        train = np.concatenate([folds[j] for j in range(nfolds) if j != k])
        best_t, best_a = None, -1.0
        for t in thresholds:
            a = acc(train, t)
            if a > best_a:  # strict: the first best threshold wins, as np.argmax
                best_t, best_a = t, a
        thrs.append(best_t)
        accs.append(acc(folds[k], best_t))
    return np.array(accs), np.array(thrs)


def _brute_force_tar(scores, issame, far):
    """Highest TAR over every possible threshold with FAR <= far (accept when score >= threshold)."""
    best = 0.0
    for t in np.concatenate([np.unique(scores), [np.inf]]):
        accept = scores >= t
        fa = np.sum(accept & ~issame) / np.sum(~issame)
        ta = np.sum(accept & issame) / np.sum(issame)
        if fa <= far:
            best = max(best, ta)
    return best


def _noisy_pairs(rng, n, dim, noise):
    """Pairs where genuine ones share an identity vector plus noise, impostors do not."""
    issame = rng.random(n) < 0.5
    base = rng.normal(size=(n, dim))
    other = rng.normal(size=(n, dim))
    emb1 = base + noise * rng.normal(size=(n, dim))
    emb2 = np.where(issame[:, None], base, other) + noise * rng.normal(size=(n, dim))
    return emb1, emb2, issame


def test_separable_set_gives_100_percent():
    rng = np.random.default_rng(0)
    n, dim = 400, 16
    issame = np.arange(n) % 2 == 0
    emb1 = rng.normal(size=(n, dim))
    emb2 = np.where(issame[:, None], emb1 + 0.01 * rng.normal(size=(n, dim)), -emb1)
    r = verification.evaluate(emb1, emb2, issame)
    assert r["accuracy"] == 1.0 and r["accuracy_std"] == 0.0
    assert len(r["fold_accuracies"]) == 10
    assert r["num_genuine"] == 200 and r["num_impostor"] == 200


def test_random_embeddings_give_chance():
    rng = np.random.default_rng(1)
    n = 2000
    r = verification.evaluate(rng.normal(size=(n, 32)), rng.normal(size=(n, 32)), rng.random(n) < 0.5)
    assert 0.44 < r["accuracy"] < 0.56


@pytest.mark.parametrize("n,noise,seed", [(300, 1.0, 0), (237, 1.5, 1), (120, 0.7, 2)])
def test_10fold_equals_brute_force(n, noise, seed):
    emb1, emb2, issame = _noisy_pairs(np.random.default_rng(seed), n, 8, noise)
    r = verification.evaluate(emb1, emb2, issame)
    accs, thrs = _brute_force_10fold(emb1, emb2, issame)
    np.testing.assert_allclose(r["fold_accuracies"], accs, atol=1e-12)
    np.testing.assert_allclose(r["fold_thresholds"], thrs, atol=1e-12)
    assert r["accuracy"] == pytest.approx(accs.mean(), abs=1e-12)
    assert r["accuracy_std"] == pytest.approx(accs.std(), abs=1e-12)
    assert 0.5 < r["accuracy"] < 1.0  # the noise level makes the task neither trivial nor random


def test_tar_at_far_equals_brute_force_and_needs_enough_impostors():
    rng = np.random.default_rng(3)
    emb1, emb2, issame = _noisy_pairs(rng, 2400, 8, 1.2)
    r = verification.evaluate(emb1, emb2, issame, fars=(1e-2, 1e-3, 1e-4))
    scores = 4.0 - verification.pair_distances(emb1, emb2)
    for far in (1e-2, 1e-3):
        assert r["tar_at_far"][far] == pytest.approx(_brute_force_tar(scores, issame, far), abs=1e-12)
    assert r["tar_at_far"][1e-4] is None  # ~1,200 impostor pairs cannot measure FAR 1e-4
    assert 0.0 < r["tar_at_far"][1e-2] < 1.0


def test_bin_layout_pairs_consecutive_rows():
    rng = np.random.default_rng(4)
    emb1, emb2, issame = _noisy_pairs(rng, 100, 8, 1.0)
    interleaved = np.empty((200, 8))
    interleaved[0::2], interleaved[1::2] = emb1, emb2
    a = verification.evaluate_pairs_embeddings(interleaved, issame)
    b = verification.evaluate(emb1, emb2, issame)
    assert a["fold_accuracies"] == b["fold_accuracies"]
    table = roc.markdown_table({"set": a}, verification.DEFAULT_FARS)
    assert "| set | 100 |" in table and f"{100 * a['accuracy']:.2f}" in table


def test_bad_inputs_raise_clear_errors():
    e = np.zeros((10, 4))
    with pytest.raises(ValueError, match="issame"):
        verification.evaluate(e, e, np.ones(9, bool))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        verification.evaluate(e, np.zeros((10, 5)), np.ones(10, bool))
    with pytest.raises(ValueError, match="NaN"):
        verification.evaluate(np.full((10, 4), np.nan), e, np.ones(10, bool))
    with pytest.raises(ValueError, match="nfolds"):
        verification.evaluate(e, e, np.ones(10, bool), nfolds=11)
    with pytest.raises(ValueError, match="2 per pair"):
        verification.evaluate_pairs_embeddings(np.zeros((9, 4)), np.ones(5, bool))


def test_one_tar_at_far_names_its_operating_point():
    """'at_most' never exceeds the FAR and can be unmeasurable; 'nearest' (the IJB read-out) always answers."""
    rng = np.random.default_rng(5)
    issame = rng.random(400) < 0.5
    scores = rng.normal(size=400) + issame
    at_most = roc.tar_at_far(scores, issame, (0.1, 1e-3), operating_point="at_most")
    nearest = roc.tar_at_far(scores, issame, (0.1, 1e-3), operating_point="nearest")
    assert at_most[1e-3] is None and nearest[1e-3] is not None
    fpr, tpr = roc.roc_points(scores, issame, drop_intermediate=False)
    assert at_most[0.1] == np.max(tpr[fpr <= 0.1])
    with pytest.raises(ValueError, match="operating_point='closest'"):
        roc.tar_at_far(scores, issame, (0.1,), operating_point="closest")
