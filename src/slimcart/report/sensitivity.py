"""Write a layer-sensitivity scan: sensitivity.json (every point), sensitivity.md (a table),
sensitivity.png (metric vs sparsity per layer) and recipe.yaml, a runnable recipe that prunes
each layer to its proposed sparsity (one magnitude_prune stage per distinct sparsity); no
recipe.yaml when no layer can be pruned within the budget."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402


def proposal_recipe(proposal: dict[str, float], max_drop: float, layer_types: list[str]) -> dict[str, Any]:
    """A recipe dict pruning each layer to its proposed sparsity; layers at 0 are left out."""
    by_sparsity: dict[float, list[str]] = {}
    for name, s in proposal.items():
        if s > 0:
            by_sparsity.setdefault(s, []).append(name)
    stages = [{"type": "magnitude_prune", "sparsity": s, "scope": "layer", "layer_types": list(layer_types),
               "include": sorted(names)} for s, names in sorted(by_sparsity.items(), reverse=True)]
    return {"name": "sensitivity-proposal", "version": 1,
            "description": f"Per-layer magnitude sparsities from a sensitivity scan (max_drop={max_drop} "
                           "per layer, each layer scored alone; the combined drop can be larger).",
            "stages": stages}


def to_markdown(scan: dict[str, Any], proposal: dict[str, float], max_drop: float) -> str:
    sparsities = sorted({p["sparsity"] for c in scan["layers"].values() for p in c})
    lines = [f"# Layer sensitivity ({scan['metric']} on the {scan['split']} split"
             + (f", {scan['limit']} rows" if scan.get("limit") else "") + ")", "",
             f"Unpruned: {scan['baseline']:.4f}. Each layer is pruned alone by weight magnitude; the last "
             f"column is the highest sparsity whose drop is at most {max_drop}.", "",
             "| layer | " + " | ".join(f"{s:.0%}" for s in sparsities) + " | proposed |",
             "|---|" + "---|" * (len(sparsities) + 1)]
    for name, curve in scan["layers"].items():  # every curve has every sparsity, ascending
        lines.append(f"| {name} | " + " | ".join(f"{p['metric']:.4f}" for p in curve)
                     + f" | {proposal.get(name, 0.0):.0%} |")
    if scan.get("skipped"):
        lines += ["", "Not scanned: " + "; ".join(f"{k} ({v})" for k, v in scan["skipped"].items())]
    return "\n".join(lines) + "\n"


def plot(scan: dict[str, Any], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=110)
    for name, curve in scan["layers"].items():
        xs = [0.0] + [p["sparsity"] for p in curve]
        ys = [scan["baseline"]] + [p["metric"] for p in curve]
        ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=name)
    ax.axhline(scan["baseline"], color="#888", lw=0.8, ls="--")
    ax.set_xlabel("sparsity of this layer alone")
    ax.set_ylabel(f"{scan['metric']} ({scan['split']})")
    ax.set_title("Layer sensitivity to magnitude pruning")
    if len(scan["layers"]) <= 24:
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def write_sensitivity(scan: dict[str, Any], proposal: dict[str, float], max_drop: float,
                      layer_types: list[str], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {"json": out / "sensitivity.json", "markdown": out / "sensitivity.md",
             "plot": out / "sensitivity.png", "recipe": out / "recipe.yaml"}
    files["json"].write_text(json.dumps({**scan, "max_drop": max_drop, "proposal": proposal}, indent=2))
    files["markdown"].write_text(to_markdown(scan, proposal, max_drop))
    plot(scan, files["plot"])
    if any(s > 0 for s in proposal.values()):
        files["recipe"].write_text(yaml.safe_dump(proposal_recipe(proposal, max_drop, layer_types),
                                                  sort_keys=False))
    else:
        del files["recipe"]  # a recipe needs at least one stage
    return files
