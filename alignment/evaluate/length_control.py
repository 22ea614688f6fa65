"""Length-controlled win rate: AlpacaEval 2's GLM without instruction difficulty, in plain numpy.

The model is alpaca_eval's `length_controlled_minimal`: P(model beats baseline) = sigmoid(w_len *
tanh(delta_len / std(delta_len)) + w_model), fitted to the judge's soft preferences (a tie is 0.5) by
L1-penalised logistic regression whose C is picked by 5-fold cross-validation over the Cs of
scikit-learn's LogisticRegressionCV, folds by question as its GroupKFold makes them. The win rate at
equal length is sigmoid(w_model). Used for AlpacaEval and for MT-Bench pairwise results alike; equal to
the package's own code on the same annotations (tests/test_alpaca_eval.py).
"""

import numpy as np

CS = np.logspace(-4, 4, 10)  # LogisticRegressionCV(Cs=10)
N_SPLITS = 5


def _cross_entropy(p: np.ndarray, z: np.ndarray) -> np.ndarray:
    """-(p log q + (1-p) log(1-q)) with q = sigmoid(z), stable for large |z|."""
    return p * np.logaddexp(0, -z) + (1 - p) * np.logaddexp(0, z)


def _fit_l1(x: np.ndarray, p: np.ndarray, c: float, sweeps: int = 200) -> np.ndarray:
    """argmin |w|_1 + c * sum_i CE(p_i, sigmoid(x_i . w)) by exact coordinate descent (two coordinates)."""
    w = np.zeros(x.shape[1])
    for _ in range(sweeps):
        before = w.copy()
        for j in range(len(w)):
            rest = x @ w - x[:, j] * w[j]

            def slope(v):  # derivative of the smooth part along w_j
                return c * np.sum(x[:, j] * (1 / (1 + np.exp(-(rest + x[:, j] * v))) - p))

            g0 = slope(0.0)
            if abs(g0) <= 1:  # the L1 kink holds w_j at zero
                w[j] = 0.0
                continue
            sign = -1.0 if g0 > 0 else 1.0  # the minimiser lies on the side where the slope is negative
            low, high = (0.0, 60.0) if sign > 0 else (-60.0, 0.0)
            for _ in range(60):  # slope(v) + sign(v) is increasing: bisect for its zero
                mid = (low + high) / 2
                if slope(mid) + sign > 0:
                    high = mid
                else:
                    low = mid
            w[j] = (low + high) / 2
        if np.max(np.abs(w - before)) < 1e-12:
            break
    return w


def length_controlled_win_rate(preferences: list[float], length_diffs: list[float]) -> float | None:
    """preferences: the model's share of each comparison (1 win, 0.5 tie, 0 loss; None unparsed);
    length_diffs: len(model answer) - len(baseline answer), in characters. None below 5 judged rows."""
    diffs = np.asarray(length_diffs, dtype=float)
    scale = diffs.std(ddof=1) if len(diffs) > 1 else 0.0
    x_len = np.tanh(diffs / scale) if scale > 0 else np.zeros_like(diffs)
    judged = np.array([p is not None for p in preferences])
    if judged.sum() < N_SPLITS:
        return None
    p = np.array([q for q in preferences if q is not None], dtype=float)
    x = np.stack([x_len[judged], np.ones(len(p))], axis=1)
    # GroupKFold (no shuffle) over equal-sized groups: the last question goes to fold 0, and so on
    folds = (len(p) - 1 - np.arange(len(p))) % N_SPLITS
    scores = np.zeros(len(CS))
    for k, c in enumerate(CS):
        for f in range(N_SPLITS):
            train, test = folds != f, folds == f
            w = _fit_l1(x[train], p[train], c)
            scores[k] -= _cross_entropy(p[test], x[test] @ w).mean()
    w = _fit_l1(x, p, CS[int(np.argmax(scores))])
    return float(1 / (1 + np.exp(-w[1])))
