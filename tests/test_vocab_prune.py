import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from slimcart import RecipeError, UsageError, artifact
from slimcart.accelerate.onnx_export import OnnxExportConfig, onnx_export
from slimcart.accelerate.ort_transformers import OrtTransformerOptimizeConfig, ort_transformer_optimize
from slimcart.measure.runtimes import OrtRunner
from slimcart.models import build
from slimcart.models.compact_embedding import CompactEmbedding
from slimcart.models.registry import load_strict
from slimcart.prune.structured import HeadPruneConfig, head_prune
from slimcart.prune.vocab import VocabPruneConfig, vocab_prune
from slimcart.quantize.embedding_quant import EmbeddingQuantConfig, embedding_quant
from slimcart.quantize.ort import OrtInt8DynamicConfig, ort_int8_dynamic
from slimcart.recipe import Recipe
from slimcart.stage import ModelState, StageContext
from slimcart.tasks.base import Split
from slimcart.tasks.intent import IntentTask
from tests.tiny import TINY, tiny

NAMES = ("input_ids", "attention_mask")
SPECIALS, UNK, MASKED_ONLY = [0, 1, 2, 3, 4], 1, 45  # [PAD] [UNK] [CLS] [SEP] [MASK]; see _split
WORDS = "encoder.embeddings.word_embeddings"


def _split(rows: int, high: int, seed: int) -> Split:
    """[CLS] words [SEP], ids 5..high-1; the first rows padded, with token 45 under the padding."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, high, (rows, 10), generator=g)
    ids[:, 0], ids[:, -1] = 2, 3
    mask = torch.ones_like(ids)
    ids[:3, 7:], mask[:3, 7:] = MASKED_ONLY, 0
    return Split((ids, mask), torch.randint(0, 3, (rows,), generator=g))


@pytest.fixture(scope="module")
def task():
    tok = SimpleNamespace(all_special_ids=SPECIALS, unk_token_id=UNK)
    splits = {"train": _split(24, 40, 0), "val": _split(8, 40, 1), "test": _split(8, 100, 2)}
    return IntentTask(dataset="tiny", splits=splits, info={"classes": ["a", "b", "c"], "num_classes": 3},
                      tokenizer=tok)


def prune(task, tmp_path, model=None, spec=None, **cfg):
    model = tiny("text") if model is None else model
    state = ModelState.from_module(model, dict(spec or TINY["text"]))
    report = vocab_prune(state, VocabPruneConfig(**cfg), StageContext(task, tmp_path, progress=False))
    return state, report


def counts(task, split="train"):
    ids, mask = task.splits[split].inputs
    return np.bincount(ids[mask.bool()].numpy(), minlength=100)


def logits(model, x):
    with torch.no_grad():
        return model.eval()(*x)


def test_kept_rows_are_bit_exact_and_all_kept_inputs_give_the_same_logits(task, tmp_path):
    ref = tiny("text")
    state, rep = prune(task, tmp_path)
    keep = counts(task) >= 1
    keep[SPECIALS] = True
    assert not keep[MASKED_ONLY]  # padded positions are not counted
    k = int(keep.sum())
    emb = state.torch_model.encoder.embeddings.word_embeddings
    old = ref.encoder.embeddings.word_embeddings.weight
    assert isinstance(emb, CompactEmbedding) and emb.weight.shape == (k + 1, 32)
    assert torch.equal(emb.id_map[torch.from_numpy(keep)], torch.arange(1, k + 1, dtype=torch.int32))
    assert torch.equal(emb.weight[1:], old[torch.from_numpy(keep)])   # ascending ids, bit for bit
    assert torch.equal(emb.weight[0], old[UNK])                       # fallback: [UNK]'s row
    x = task.example_inputs(8, "val")                                 # every token kept
    assert torch.equal(logits(state.torch_model, x), logits(ref, x))
    assert rep.changed == {WORDS: f"word embeddings 100 -> {k} rows (+1 fallback)"}
    assert rep.stats["bytes_before"] == 100 * 32 * 4
    assert rep.stats["bytes_after"] == (k + 1) * 32 * 4 + 4 * 100
    assert (rep.stats["rows_before"], rep.stats["rows_after"], rep.stats["tokens_kept"]) == (100, k + 1, k)
    assert any("fallback row" in n and "tokenizer is unchanged" in n for n in rep.notes)
    assert state.spec["vocab_pruning"] == {"module": WORDS, "num_ids": 100, "kept_rows": k}


def test_dropped_tokens_read_the_fallback_row(task, tmp_path):
    ref = tiny("text")
    state, _ = prune(task, tmp_path)
    ids, mask = task.example_inputs(8, "test")         # ids up to 99: many never seen in training
    kept = state.torch_model.encoder.embeddings.word_embeddings.id_map > 0
    assert (~kept[ids]).any()
    as_unk = torch.where(kept[ids], ids, torch.full_like(ids, UNK))
    assert torch.allclose(logits(state.torch_model, (ids, mask)), logits(ref, (as_unk, mask)), atol=1e-6)
    # mean fallback, rare tokens dropped too, special ids not forced
    state, rep = prune(task, tmp_path, min_count=3, keep_special=False, fallback="mean")
    c = counts(task)
    keep = c >= 3
    emb = state.torch_model.encoder.embeddings.word_embeddings
    old = ref.encoder.embeddings.word_embeddings.weight.detach()
    assert torch.equal(emb.id_map > 0, torch.from_numpy(keep)) and not keep[[0, 1, 4]].any()
    assert torch.allclose(emb.weight[0], old[torch.from_numpy(~keep)].mean(0), atol=1e-6)
    assert rep.stats["positions_remapped_share"] == pytest.approx(c[~keep].sum() / c.sum())
    patched = copy.deepcopy(ref)
    with torch.no_grad():
        patched.encoder.embeddings.word_embeddings.weight[torch.from_numpy(~keep)] = emb.weight[0]
    assert torch.allclose(logits(state.torch_model, (ids, mask)), logits(patched, (ids, mask)), atol=1e-6)


def test_nearest_fallback_reads_the_most_similar_kept_row(task, tmp_path):
    ref = tiny("text")
    old = ref.encoder.embeddings.word_embeddings.weight.detach()
    state, rep = prune(task, tmp_path, fallback="nearest")
    emb = state.torch_model.encoder.embeddings.word_embeddings
    keep = counts(task) >= 1
    keep[SPECIALS] = True
    kept_ids = np.flatnonzero(keep)
    # kept ids still read their own rows; each dropped id reads the kept row of highest cosine
    assert torch.equal(emb.id_map[torch.from_numpy(kept_ids)], torch.arange(1, len(kept_ids) + 1, dtype=torch.int32))
    unit = torch.nn.functional.normalize(old, dim=1)
    for i in np.flatnonzero(~keep):
        want = kept_ids[int((unit[kept_ids] @ unit[i]).argmax())]
        assert torch.equal(emb.weight[emb.id_map[i]], old[want]), i
    ids, mask = task.example_inputs(8, "test")
    as_nearest = torch.from_numpy(kept_ids)[emb.id_map[ids].long() - 1]
    assert torch.allclose(logits(state.torch_model, (ids, mask)), logits(ref, (as_nearest, mask)), atol=1e-6)
    assert any("closest to its own" in n for n in rep.notes)
    again = build(state.spec)  # the id map is a saved buffer: the folder reloads it as it is
    load_strict(again, state.torch_model.state_dict(), "test")
    assert torch.equal(logits(again, (ids, mask)), logits(state.torch_model, (ids, mask)))


def test_spec_rebuilds_and_loads_strictly_alone_and_with_later_stages(task, tmp_path):
    state, _ = prune(task, tmp_path)
    rebuilt = build(state.spec)
    load_strict(rebuilt, state.torch_model.state_dict(), "test")
    x = task.example_inputs(8, "test")
    assert torch.equal(logits(rebuilt, x), logits(state.torch_model, x))
    ctx = StageContext(task, tmp_path, progress=False)
    head_prune(state, HeadPruneConfig(heads_ratio=0.5), ctx)         # spec: vocab_pruning + reshape
    embedding_quant(state, EmbeddingQuantConfig(bits=8), ctx)         # + embedding_quant
    assert {"vocab_pruning", "reshape", "embedding_quant"} <= set(state.spec)
    folder = artifact.save(state, tmp_path / "v", task={"name": "intent"}, examples=x, input_names=NAMES)
    loaded = artifact.load(folder).torch_model
    assert torch.equal(logits(loaded, x), logits(state.torch_model, x))


def test_head_prune_first_then_vocab_prune_saves_and_loads(task, tmp_path):
    model = tiny("text")
    state = ModelState.from_module(model, dict(TINY["text"]))
    head_prune(state, HeadPruneConfig(ffn_ratio=0.5), StageContext(task, tmp_path, progress=False))
    state, _ = prune(task, tmp_path, model=state.torch_model, spec=state.spec)
    x = task.example_inputs(4, "test")
    folder = artifact.save(state, tmp_path / "v", task={"name": "intent"}, examples=x, input_names=NAMES)
    assert torch.equal(logits(artifact.load(folder).torch_model, x), logits(state.torch_model, x))


def test_onnx_export_parity_then_int8_and_transformer_optimizer(task, tmp_path):
    state, _ = prune(task, tmp_path)
    eager = copy.deepcopy(state.torch_model)
    ctx = StageContext(task, tmp_path, stage_index=1, progress=False)
    rep = onnx_export(state, OnnxExportConfig(parity_batch=8), ctx)
    assert rep.stats["max_abs_error"] < 1e-4
    x = task.example_inputs(8, "test")                                # dropped tokens too
    assert np.abs(OrtRunner(state.onnx_path, NAMES)(x) - logits(eager, x).numpy()).max() < 1e-4
    fused_state = copy.copy(state)
    ctx.stage_index = 2
    rep = ort_transformer_optimize(fused_state, OrtTransformerOptimizeConfig(), ctx)
    assert "EmbedLayerNormalization" in rep.skipped["<embeddings>"] and rep.stats["max_abs_error"] < 1e-4
    ctx.stage_index = 3
    rep = ort_int8_dynamic(state, OrtInt8DynamicConfig(), ctx)
    assert "/encoder/embeddings/word_embeddings/Gather_1" in rep.changed        # the compact table
    assert "integer table" in rep.skipped["/encoder/embeddings/word_embeddings/Gather"]  # the id map
    ref = logits(eager, x).numpy()
    assert np.abs(OrtRunner(state.onnx_path, NAMES)(x) - ref).max() < 0.05 * np.abs(ref).max() + 1e-3


def test_hugging_face_layout_is_found(task, tmp_path):
    spec = {"arch": "hf_sequence_classification", "config": {"model_type": "distilbert", "hf_config": {
        "vocab_size": 100, "dim": 32, "n_layers": 1, "n_heads": 4, "hidden_dim": 64,
        "max_position_embeddings": 64, "num_labels": 3}}}
    torch.manual_seed(0)
    model = build(spec).eval()
    ref = copy.deepcopy(model)
    state, rep = prune(task, tmp_path, model=model, spec=spec)
    assert list(rep.changed) == ["model.distilbert.embeddings.word_embeddings"]
    x = task.example_inputs(8, "val")
    assert torch.equal(logits(state.torch_model, x), logits(ref, x))
    rebuilt = build(state.spec)
    load_strict(rebuilt, state.torch_model.state_dict(), "test")


def test_config_and_model_errors_are_clear(task, tmp_path):
    with pytest.raises(ValidationError, match="min_count"):
        VocabPruneConfig(min_count=0)
    with pytest.raises(RecipeError, match=r"stages\[0\]\.splits: .*unknown split\(s\) \['dev'\]"):
        Recipe.from_dict({"stages": [{"type": "vocab_prune", "splits": ["dev"]}]})
    with pytest.raises(ValidationError, match="at least one split"):
        VocabPruneConfig(splits=[])
    with pytest.raises(UsageError, match="vocab_prune: DeepFM has no word-embedding table"):
        prune(task, tmp_path, model=tiny("deepfm"), spec=TINY["deepfm"])
    no_val = IntentTask(dataset="t", splits={"train": task.splits["train"]}, tokenizer=task.tokenizer)
    with pytest.raises(UsageError, match="vocab_prune.splits: the task has no 'val' split"):
        prune(no_val, tmp_path, splits=["train", "val"])
    no_unk = IntentTask(dataset="t", splits=task.splits, tokenizer=None)
    with pytest.raises(UsageError, match="fallback 'unk' needs the \\[UNK\\] token id"):
        prune(no_unk, tmp_path)
    state, _ = prune(no_unk, tmp_path, fallback="mean")  # special ids from the model config: pad 0
    assert state.torch_model.encoder.embeddings.word_embeddings.id_map[0] > 0
