"""Tiny variants of every architecture, for fast exact tests."""
import torch

from slimcart.models import build

TINY = {
    "cnn": {"arch": "resnet_small", "config": {"widths": [4, 8, 8], "blocks": [1, 1, 1], "num_classes": 5}},
    "deepfm": {"arch": "deepfm", "config": {"vocab_sizes": [50, 7, 300], "num_dense": 2, "embed_dim": 4,
                                            "hidden": [16, 8]}},
    "text": {"arch": "text_classifier", "config": {"num_labels": 3, "encoder": {
        "vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "max_position_embeddings": 64}}},
}


def tiny(name: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = build(TINY[name]).eval()
    with torch.no_grad():  # make weights and BN statistics non-trivial
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    model.slimcart_spec = TINY[name]
    return model


def tiny_inputs(name: str, batch: int = 6, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    if name == "cnn":
        return (torch.randn(batch, 1, 16, 16, generator=g),)
    if name == "deepfm":
        sparse = torch.stack([torch.randint(0, v, (batch,), generator=g) for v in (50, 7, 300)], 1)
        return sparse, torch.randn(batch, 2, generator=g)
    ids = torch.randint(1, 100, (batch, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return ids, mask


def tiny_ctr_task():
    """160 rows of three categorical fields and two dense features: 120 train, 20 val, 20 test."""
    import numpy as np

    from slimcart.tasks.ctr import CTRTask

    g = np.random.default_rng(0)
    n = 160
    sparse = np.stack([g.integers(0, v, n) for v in (50, 7, 300)], 1)
    dense, y = g.normal(size=(n, 2)), (g.random(n) < 0.4).astype(np.float32)
    info = {"dense": ["d0", "d1"], "vocab_sizes": [50, 7, 300]}
    return CTRTask._from_arrays("t", sparse, dense, y, (np.arange(120), np.arange(120, 140),
                                                         np.arange(140, 160)), info)
