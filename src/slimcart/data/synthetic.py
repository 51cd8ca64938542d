"""A synthetic click log with a planted ground truth.

Ids follow a truncated power law per field. Each id's first-order weight and latent vector
come from an integer hash of (seed, field, id, component), so no per-id table is ever built
and memory does not grow with the vocabulary. The click probability is a factorization
machine over those weights plus a linear term on dense features; the planted probability is
kept, so the best reachable AUC (the ceiling) is known.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import numpy as np

from ..errors import DataError

CHUNK_ROWS = 262_144
TARGET_LOGIT_STD = 1.3          # spread of the planted logit (sets the ceiling AUC)
SHARES = {"first": 0.35, "pairs": 0.45, "dense": 0.20}  # variance split of the logit
_MASK64 = 2**64 - 1

_LIMITS = {  # key: (low, high or None, what the value must be)
    "rows": (100, None, "an integer >= 100"),
    "fields": (1, 100, "an integer from 1 to 100"),
    "vocab": (2, 10_000_000, "an integer from 2 to 10000000"),
    "dense": (0, 64, "an integer from 0 to 64"),
    "alpha": (0.5, None, "a number >= 0.5"),
    "embed_dim": (1, 64, "an integer from 1 to 64"),
    "base_rate": (0.0, 1.0, "a number strictly between 0 and 1"),
    "seed": (0, 2**63 - 1, "an integer >= 0"),
}


@dataclass(frozen=True)
class SyntheticSpec:
    rows: int = 200_000
    fields: int = 8
    vocab: int = 100_000
    dense: int = 2
    alpha: float = 1.1
    embed_dim: int = 4
    base_rate: float = 0.1
    seed: int = 0

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            low, high, text = _LIMITS[f.name]
            kinds = (int, np.integer) if f.type == "int" else (int, float, np.number)
            ok = (isinstance(value, kinds) and not isinstance(value, bool)
                  and math.isfinite(value) and value >= low and (high is None or value <= high))
            if f.name == "base_rate":
                ok = ok and low < value < high
            if not ok:
                raise DataError(f"Synthetic data: {f.name}={value!r} is out of range; "
                                f"{f.name} must be {text}.",
                                "Fix the value in the dataset spec, e.g. "
                                "synthetic:rows=1000000,fields=26,vocab=10000000,seed=3.")


def parse_spec(text: str) -> SyntheticSpec:
    """Parse ``synthetic`` or ``synthetic:key=value,...`` into a SyntheticSpec."""
    name, _, rest = str(text).strip().partition(":")
    if name.strip() != "synthetic":
        raise DataError(f"Dataset spec {text!r} is not a synthetic spec.",
                        "Write 'synthetic' or 'synthetic:rows=100000,fields=8,seed=1'.")
    keys = [f.name for f in dataclasses.fields(SyntheticSpec)]
    types = {f.name: f.type for f in dataclasses.fields(SyntheticSpec)}
    values: dict[str, int | float] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if key not in keys:
            raise DataError(f"Dataset spec {text!r}: unknown key {key!r}.",
                            f"Known keys: {', '.join(keys)}.")
        if not eq or not raw:
            raise DataError(f"Dataset spec {text!r}: key {key!r} has no value.",
                            f"Write {key}=VALUE; {key} must be {_LIMITS[key][2]}.")
        if key in values:
            raise DataError(f"Dataset spec {text!r}: key {key!r} is given twice.",
                            "Give each key once.")
        values[key] = _number(key, raw, types[key] == "int")
    return SyntheticSpec(**values)


def _number(key: str, raw: str, integer: bool) -> int | float:
    text = _LIMITS[key][2]
    try:
        number = float(raw)
    except ValueError:
        raise DataError(f"Synthetic data: {key}={raw!r} is not a number; {key} must be {text}.",
                        "Fix the value in the dataset spec.") from None
    if not integer:
        return number
    if not math.isfinite(number) or number != int(number):
        raise DataError(f"Synthetic data: {key}={raw!r} is not an integer; {key} must be {text}.",
                        "Fix the value in the dataset spec.")
    try:
        return int(raw)
    except ValueError:  # '1e6' and the like
        return int(number)


@dataclass
class ClickLog:
    sparse: np.ndarray      # int64 [rows, fields], ids in [0, vocab)
    dense: np.ndarray       # float32 [rows, dense]
    labels: np.ndarray      # float32 [rows], 0/1
    true_prob: np.ndarray   # float32 [rows], the planted click probability
    spec: SyntheticSpec

    def ceiling_auc(self) -> float:
        """AUC of the planted probability: the best any model can reach on these labels."""
        from sklearn.metrics import roc_auc_score

        positives = int(self.labels.sum())
        if positives == 0 or positives == len(self.labels):
            raise DataError("Synthetic data has only one label class, so AUC is undefined.",
                            "Use more rows or a base_rate further from 0 and 1.")
        return float(roc_auc_score(self.labels, self.true_prob))

    def id_counts(self, field: int) -> np.ndarray:
        """How often each id occurs in ``field`` (length vocab)."""
        if not isinstance(field, (int, np.integer)) or not 0 <= field < self.spec.fields:
            raise DataError(f"id_counts: field={field!r} does not exist.",
                            f"Pass a field index from 0 to {self.spec.fields - 1}.")
        return np.bincount(self.sparse[:, field], minlength=self.spec.vocab)


def data_limited_auc(log: ClickLog, train_rows: np.ndarray, eval_rows: np.ndarray) -> float:
    """An optimistic estimate of the best AUC a model can reach on ``eval_rows`` after learning
    from ``train_rows`` (the planted ceiling assumes every id's weights are known exactly, which
    no finite log allows: an id seen c times is known to about 1 / sqrt(c * p(1-p))).

    Each id's planted weights are replaced by their Gaussian posterior mean given its train count
    c: ``k * (w + e)`` with ``e ~ N(0, 1 / (c * I))`` drawn once per (field, id, component) and
    ``k = c * I / (c * I + 1 / s**2)`` (prior N(0, s**2) as planted). I is the Fisher information
    of one occurrence: the log's mean p(1-p) for first-order weights, times the expected square of
    the other fields' summed latent component for latent weights. Ids never seen get 0. The
    estimate grants the learner the model's form, the priors, the dense weights and every other
    id's weights, so real models stay below it."""
    spec, model = log.spec, _Planted(log.spec)
    train_rows, eval_rows = np.asarray(train_rows), np.asarray(eval_rows)
    p = log.true_prob[train_rows].astype(np.float64)
    info = float((p * (1.0 - p)).mean())
    sparse = log.sparse[eval_rows]
    counts = np.stack([np.bincount(log.sparse[train_rows, f], minlength=spec.vocab)[sparse[:, f]]
                       for f in range(spec.fields)], axis=1).astype(np.float64)
    seen = counts > 0

    def posterior(component: int, scale: float, per_occurrence: float) -> np.ndarray:
        true = _hash_normal(sparse, model.salts[component]) * scale
        fisher = counts * per_occurrence
        noise = _hash_normal(sparse, model.salts[component] ^ np.uint64(0xA5A5A5A5)) / np.sqrt(np.maximum(fisher, 1e-12))
        shrink = fisher / (fisher + 1.0 / scale**2)
        return np.where(seen, shrink * (true + noise), 0.0)

    z = posterior(0, model.w_scale, info).sum(axis=1)
    if model.v_scale:
        latent_info = info * (spec.fields - 1) * model.v_scale**2
        for c in range(1, spec.embed_dim + 1):
            v = posterior(c, model.v_scale, latent_info)
            z += 0.5 * (v.sum(axis=1) ** 2 - (v * v).sum(axis=1))
    if spec.dense:
        z += log.dense[eval_rows].astype(np.float64) @ model.u
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(log.labels[eval_rows], z))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _hash_normal(ids: np.ndarray, salt: np.ndarray) -> np.ndarray:
    """Approximately N(0, 1) value per (id, salt): the scaled sum of four 16-bit uniforms."""
    with np.errstate(over="ignore"):
        h = _splitmix64(ids.astype(np.uint64) * np.uint64(0xD6E8FEB86659FD93) + salt)
    m = np.uint64(0xFFFF)
    total = ((h & m) + ((h >> np.uint64(16)) & m) + ((h >> np.uint64(32)) & m)
             + (h >> np.uint64(48))).astype(np.float64)
    return (total + 2.0) / 65536.0 * math.sqrt(3.0) - 2.0 * math.sqrt(3.0)


def _salts(seed: int, fields: int, component: int) -> np.ndarray:
    """One uint64 salt per field for a weight component (0: first order, 1..k: latent)."""
    base = np.uint64((seed * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & _MASK64)
    keys = base ^ (np.arange(fields, dtype=np.uint64) << np.uint64(8)) ^ np.uint64(component)
    return _splitmix64(keys)


@functools.lru_cache(maxsize=64)
def _multiplier(vocab: int) -> int:
    """A prime near vocab / golden ratio, coprime with vocab: consecutive ranks land far apart."""
    p = max(2, int(vocab * 0.6180339887))
    while not (_is_prime(p) and math.gcd(p, vocab) == 1):
        p += 1
    return p


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, math.isqrt(n) + 1))


def _sample_ids(u: np.ndarray, spec: SyntheticSpec, offsets: np.ndarray) -> np.ndarray:
    """Inverse-CDF sample of a power law over ranks 1..vocab, then a scattering bijection."""
    a, n = spec.alpha, spec.vocab
    log_top = math.log(n + 1.0)
    if abs(1.0 - a) < 1e-9:
        x = np.exp(u * log_top)
    else:
        x = np.exp(np.log1p(u * math.expm1((1.0 - a) * log_top)) / (1.0 - a))
    rank = np.clip(np.floor(x).astype(np.int64), 1, n)
    return ((rank - 1) * _multiplier(n) + offsets) % n


class _Planted:
    """The planted model's parameters and its logit for a chunk of rows."""

    def __init__(self, spec: SyntheticSpec):
        self.spec = spec
        pairs = spec.fields * (spec.fields - 1) // 2
        shares = {"first": SHARES["first"], "pairs": SHARES["pairs"] if pairs else 0.0,
                  "dense": SHARES["dense"] if spec.dense else 0.0}
        total = sum(shares.values())
        var = {k: v / total * TARGET_LOGIT_STD**2 for k, v in shares.items()}
        self.w_scale = math.sqrt(var["first"] / spec.fields)
        # Var <v_f, v_g> = k * s^4 for independent N(0, s^2) entries.
        self.v_scale = (var["pairs"] / (pairs * spec.embed_dim)) ** 0.25 if pairs else 0.0
        rng = np.random.default_rng([spec.seed, 1])
        u = rng.standard_normal(spec.dense)
        norm = np.linalg.norm(u)
        self.u = (u / norm * math.sqrt(var["dense"]) if norm > 0 else u).astype(np.float64)
        self.salts = [_salts(spec.seed, spec.fields, c) for c in range(spec.embed_dim + 1)]
        self.offsets = (_splitmix64(self.salts[0] ^ np.uint64(0x5EED))
                        % np.uint64(spec.vocab)).astype(np.int64)

    def logit(self, sparse: np.ndarray, dense: np.ndarray) -> np.ndarray:
        z = _hash_normal(sparse, self.salts[0]).sum(axis=1) * self.w_scale
        if self.v_scale:
            for c in range(1, self.spec.embed_dim + 1):
                v = _hash_normal(sparse, self.salts[c]) * self.v_scale
                z += 0.5 * (v.sum(axis=1) ** 2 - (v * v).sum(axis=1))
        if self.spec.dense:
            z += dense.astype(np.float64) @ self.u
        return z


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _calibrate_bias(z: np.ndarray, rate: float) -> float:
    """The bias b with mean(sigmoid(b + z)) == rate, by bisection."""
    lo, hi = -40.0, 40.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if _sigmoid(mid + z).mean() < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def generate(spec: SyntheticSpec) -> ClickLog:
    """Generate ``spec.rows`` rows, chunk by chunk; deterministic for ``spec.seed``."""
    if not isinstance(spec, SyntheticSpec):
        raise DataError(f"generate: spec must be a SyntheticSpec, got {type(spec).__name__}.",
                        "Build one with parse_spec('synthetic:...') or SyntheticSpec(...).")
    rng = np.random.default_rng(spec.seed)
    model = _Planted(spec)
    sparse = np.empty((spec.rows, spec.fields), dtype=np.int64)
    dense = np.empty((spec.rows, spec.dense), dtype=np.float32)
    labels = np.empty(spec.rows, dtype=np.float32)
    prob = np.empty(spec.rows, dtype=np.float32)
    bias = None
    for start in range(0, spec.rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, spec.rows)
        ids = _sample_ids(rng.random((stop - start, spec.fields)), spec, model.offsets)
        x = rng.standard_normal((stop - start, spec.dense), dtype=np.float32)
        z = model.logit(ids, x)
        if bias is None:
            bias = _calibrate_bias(z, spec.base_rate)
        p = _sigmoid(z + bias)
        sparse[start:stop], dense[start:stop], prob[start:stop] = ids, x, p
        labels[start:stop] = rng.random(stop - start) < p
    return ClickLog(sparse=sparse, dense=dense, labels=labels, true_prob=prob, spec=spec)
