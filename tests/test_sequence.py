"""Sequence models and character-level language modelling (issue 8): text windows, char models,
recurrent/attention prunable weights, exact sparsity under RigL with Adam + clipping, per-token FLOPs,
presets, LM compare rows, and ONNX export of GRU/Transformer runs validated in ONNX Runtime."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import TinyGRU
from torch import nn

from sparsekit.config import build_config, read_config_file
from sparsekit.data import load_dataset
from sparsekit.data.text import make_text_dataset, stdlib_docs_text, windows
from sparsekit.distributions import plan_layers
from sparsekit.errors import InputError
from sparsekit.flops import run_flops, weight_positions
from sparsekit.masks import gate_block_shapes, prunable_weights
from sparsekit.methods import make_method
from sparsekit.models import build_model
from sparsekit.settings import SparsitySettings
from sparsekit.sparsifier import Sparsifier
from sparsekit.tasks import get_task

CORPUS = ("The quick brown fox jumps over the lazy dog. " * 40 + "Pack my box with five dozen liquor jugs. " * 40)


@pytest.fixture
def corpus(tmp_path):
    p = tmp_path / "corpus.txt"
    p.write_text(CORPUS, encoding="utf-8")
    return p


# ---------------------------------------------------------------- data


def test_windows_have_next_symbol_targets():
    codes = np.arange(11)
    x, y = windows(codes, 3)
    assert x.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert y.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]  # last target = first symbol of the next window


def test_text_split_by_position_byte_vocab(corpus):
    d = load_dataset(f"text:{corpus}", seq_len=16, val_fraction=0.25)
    raw = np.frombuffer(CORPUS.encode(), np.uint8)
    cut = round(len(raw) * 0.75)
    assert d.task == "language-modeling" and d.num_classes == 256 and d.input_shape == (16,)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.x_train.shape == (d.y_train.shape[0], 16) and len(d.x_train) == (cut - 1) // 16
    assert d.x_train[0].long().tolist() == raw[:16].tolist()
    assert d.y_train[0].tolist() == raw[1:17].tolist()
    assert d.x_test[0].long().tolist() == raw[cut:cut + 16].tolist()  # test = the text after the cut
    assert len(d.x_test) == (len(raw) - cut - 1) // 16


def test_char_vocab_is_sorted_characters(corpus):
    d = load_dataset(f"text:{corpus}", seq_len=8, vocab="char")
    chars = sorted(set(CORPUS))
    assert d.num_classes == len(chars) and d.normalization["chars"] == "".join(chars)
    assert "".join(chars[int(i)] for i in d.x_train[0]) == CORPUS[:8]


def test_text_errors(corpus, tmp_path):
    with pytest.raises(InputError, match="too short"):
        make_text_dataset("abc", name="text", spec="text:x", where="x", seq_len=8)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"\xff\xfe\x00abc")
    with pytest.raises(InputError, match="not UTF-8"):
        load_dataset(f"text:{bad}")
    with pytest.raises(InputError, match="only applies to text"):
        load_dataset("digits", seq_len=8)


def test_stdlib_docs_is_real_deterministic_text():
    text = stdlib_docs_text()
    assert len(text) > 200_000 and "assert" in text and text == stdlib_docs_text()
    d = load_dataset("stdlib-docs", seq_len=256)
    assert d.normalization["symbols"] == len(text.encode()) and len(d.x_test) > 100


# ---------------------------------------------------------------- models and prunable weights


@pytest.mark.parametrize("name", ["char-gru", "char-lstm", "char-transformer"])
def test_char_models_output_logits_per_position(name):
    m = build_model(name, {"width": 0.125}, input_shape=(12,), num_classes=256)
    x = torch.randint(0, 256, (3, 12)).float()
    assert m(x).shape == (3, 12, 256)
    assert torch.isfinite(m(torch.randn(2, 12) * 1000)).all()  # any float input is clamped into the vocab


def test_char_gru_has_the_papers_shape():
    m = build_model("char-gru", {}, input_shape=(512,), num_classes=256)  # (meta would import torch._refs: 8 s)
    shapes = {n: tuple(p.shape) for n, p in prunable_weights(m).items()}
    assert shapes == {"rnn.weight_ih_l0": (3 * 512, 128), "rnn.weight_hh_l0": (3 * 512, 512),
                      "fc1.weight": (256, 512), "fc2.weight": (128, 256), "head.weight": (256, 128)}
    assert tuple(m.embed.weight.shape) == (256, 128)


def test_prunable_set_has_recurrent_and_attention_matrices_not_embeddings_or_norms():
    gru = prunable_weights(build_model("char-lstm", {"width": 0.125}, input_shape=(8,), num_classes=256))
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= set(gru) and "embed.weight" not in gru
    tr = prunable_weights(build_model("char-transformer", {"width": 0.125}, input_shape=(8,), num_classes=256))
    assert "encoder.layers.0.self_attn.in_proj_weight" in tr
    assert "encoder.layers.0.self_attn.out_proj.weight" in tr and "encoder.layers.3.linear2.weight" in tr
    assert not any("embed" in n or "pos" in n or "norm" in n for n in tr)


def test_erk_scores_stacked_gates_by_one_gate_block():
    """A GRU (3H, in) matrix gets the ERK density of a standalone (H, in) Linear, not of a (3H, in) one."""
    gru = nn.GRU(8, 16)
    blocks = gate_block_shapes(nn.Sequential(gru))
    assert blocks == {"0.weight_ih_l0": (16, 8), "0.weight_hh_l0": (16, 16)}
    shapes = {"gru": (48, 8), "twin": (16, 8), "other": (32, 32)}
    plans = {p.name: p for p in plan_layers(shapes, 0.8, "erk", score_shapes={"gru": (16, 8)})}
    assert plans["gru"].density == pytest.approx(plans["twin"].density)
    assert sum(p.active for p in plans.values()) == round(0.2 * sum(math.prod(s) for s in shapes.values()))
    mha = nn.MultiheadAttention(8, 2)
    assert gate_block_shapes(nn.Sequential(mha)) == {"0.in_proj_weight": (8, 8)}


# ---------------------------------------------------------------- methods on recurrent weights


def _tiny_gru() -> nn.Module:
    torch.manual_seed(0)
    return build_model("char-gru", {"width": 0.0625}, input_shape=(10,), num_classes=256)


def _batches(n: int):
    g = torch.Generator().manual_seed(1)
    text = torch.tensor(list(CORPUS.encode()))
    for _ in range(n):
        starts = torch.randint(0, len(text) - 11, (8,), generator=g)
        seq = torch.stack([text[s:s + 11] for s in starts.tolist()])
        yield seq[:, :-1].float(), seq[:, 1:]


@pytest.mark.parametrize("method", ["rigl", "set", "snfs", "static", "pruning", "dense"])
def test_methods_keep_recurrent_masks_exact_with_adam_and_clipping(method):
    model = _tiny_gru()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, weight_decay=5e-4)
    opts = {"update_interval": 3, "drop_fraction": 0.3, "update_end": 1.0} if method in ("rigl", "set", "snfs") \
        else {"prune_begin": 0.1, "prune_end": 0.6, "prune_interval": 2} if method == "pruning" else {}
    settings = SparsitySettings(sparsity=0.75, total_steps=12, distribution="uniform", dense_first_layer=False)
    sp = Sparsifier(model, opt, make_method(method, **opts), settings)
    task = get_task("language-modeling")
    first = {ly.name: ly.mask.clone() for ly in sp.layers}
    for x, y in _batches(12):
        task.loss(model(x), y).backward()
        take = sp.pre_step()
        nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        if take:
            opt.step()
        sp.post_step()
        opt.zero_grad(set_to_none=True)
    if method == "dense":
        assert sp.layers == [] and sp.realized_sparsity() == 0.0
        return
    names = {ly.name for ly in sp.layers}
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0", "head.weight"} <= names
    for ly in sp.layers:
        assert ly.active == ly.mask.numel() // 4, ly.name  # uniform 75%: exactly a quarter of every matrix
        assert (ly.param[~ly.mask] == 0).all(), ly.name
        for state in opt.state[ly.param].values():
            if isinstance(state, torch.Tensor) and state.shape == ly.param.shape:
                assert (state[~ly.mask] == 0).all(), ly.name
    assert sp.realized_sparsity() == 0.75
    if method in ("rigl", "set", "snfs"):
        assert any(not torch.equal(first[ly.name], ly.mask) for ly in sp.layers if "rnn" in ly.name)


def test_small_dense_narrows_the_gru_to_the_sparse_budget(corpus):
    cfg = build_config(None, {"model": "char-gru", "model_kwargs": {"width": 0.25}, "data": f"text:{corpus}",
                              "method": "small-dense", "sparsity": 0.75, "seq_len": 16}, {})
    data = load_dataset(cfg.data, seq_len=cfg.seq_len)
    kwargs, info = make_method("small-dense").choose_model_kwargs(cfg, data)
    assert kwargs["width"] < 0.25 and 0 <= info["gap"] and info["params"] <= info["sparse_active_budget"]


# ---------------------------------------------------------------- FLOPs per token


def test_flops_per_token_of_a_hand_computed_gru():
    """Per token: W_ih 12×3 = 36, W_hh 12×4 = 48, head 7×4 = 28 MACs → 112 dense; at uniform 50% → 56."""
    model = TinyGRU()
    assert weight_positions(model, (5,)) == {"rnn.weight_ih_l0": 5, "rnn.weight_hh_l0": 5, "head.weight": 5}
    settings = SparsitySettings(sparsity=0.5, total_steps=1, distribution="uniform", dense_first_layer=False)
    sp = Sparsifier(model, None, make_method("static"), settings)
    f = run_flops(model, sp, input_shape=(5,))
    assert f["inference"]["dense_macs"] == 5 * 112 and f["inference"]["sparse_macs"] == 5 * 56
    assert f["per_token"]["tokens_per_sample"] == 5
    assert f["per_token"]["dense_macs"] == 112 and f["per_token"]["sparse_macs"] == 56
    assert f["per_token"]["dense_flops"] == 224 and f["per_token"]["attention_macs"] == 0


def test_flops_count_attention_projections_per_token():
    m = build_model("char-transformer", {"width": 0.125}, input_shape=(6,), num_classes=256)
    d = m.head.in_features
    pos = weight_positions(m, (6,))
    assert pos["encoder.layers.0.self_attn.in_proj_weight"] == 6
    assert pos["encoder.layers.0.self_attn.out_proj.weight"] == 6  # used via F.linear, counted by the MHA hook
    sp = Sparsifier(m, None, make_method("dense"), SparsitySettings(sparsity=0.0, total_steps=1))
    f = run_flops(m, sp, input_shape=(6,))
    per_layer = 3 * d * d + d * d + 2 * 4 * d * d  # in_proj + out_proj + FFN (4d) per token
    assert f["per_token"]["dense_macs"] == 4 * per_layer + 256 * d
    assert f["per_token"]["attention_macs"] == 4 * 2 * 6 * d  # QKᵀ and AV: 2·T·d per token per layer


# ---------------------------------------------------------------- presets and compare rows


def test_presets_resolve_to_the_paper_recipe():
    paper = build_config("preset:char-gru-paper", {}, {})
    assert (paper.model, paper.sparsity, paper.distribution, paper.optimizer, paper.lr) == \
        ("char-gru", 0.75, "uniform", "adam", 0.0007)
    assert (paper.seq_len, paper.batch_size, paper.steps, paper.clip_grad, paper.weight_decay) == \
        (512, 32, 200_000, 10.0, 0.0005)
    assert paper.method_options["drop_fraction"] == 0.1 and paper.method_options["update_interval"] == 100
    assert paper.method_options["update_end"] == 1.0
    quick = build_config("preset:char-gru-quick", {"method": "set"}, {})
    assert quick.model_kwargs == {"width": 0.25} and quick.seq_len == 128 and quick.method == "set"
    with pytest.raises(InputError, match="unknown preset"):
        read_config_file("preset:char-gru-qiuck")


def test_lm_compare_rows_report_bits_per_character():
    from sparsekit.compare import CompareSpec, aggregate, format_row, plan_runs

    spec = CompareSpec(methods=["rigl", "dense"], sparsities=[0.75], train={"steps": 2})
    runs = plan_runs(spec)
    fake = [(r, {"task": "language-modeling", "test_bpc": bpc, "test_accuracy": 0.5, "realized_sparsity": 0.75,
                 "flops": {"training": {"vs_dense": 0.3}}, "config": {"model": "char-gru", "data": "stdlib-docs"}})
            for r, bpc in zip(runs, [2.0, 2.5], strict=True)]
    result = aggregate(fake, spec)
    assert [row["bpc_mean"] for row in result["rows"]] == [2.0, 2.5]
    assert "smoke test" in result["note"] and result["spec"]["task"] == "language-modeling"
    assert format_row(result["rows"][0])["bpc"] == "2.000"


# ---------------------------------------------------------------- train CLI and ONNX export


@pytest.mark.slow  # ~10-25 s: the dynamo ONNX export at the end of training dominates
def test_train_cli_char_gru_reaches_exactly_75_percent_and_reports_bpc(cli, corpus, tmp_path):
    out = tmp_path / "gru"
    res = cli(["train", "--model", "char-gru", "--data", f"text:{corpus}", "--method", "rigl", "--sparsity", "0.75",
               "--model-kwargs", "width=0.0625", "--seq-len", "16", "--steps", "12", "--update-interval", "4",
               "--batch-size", "8", "--optimizer", "adam", "--lr", "0.003", "--clip-grad", "10", "--out", str(out),
               "--quiet", "--json"])
    assert res.exit_code == 0, res.stderr
    s = res.json()
    assert s["task"] == "language-modeling" and s["total_steps"] == 12
    assert s["test_bpc"] == pytest.approx(s["test_loss"] / math.log(2))
    assert s["test_perplexity"] == pytest.approx(math.exp(s["test_loss"]))
    prunable = [ly for ly in s["layers"] if ly["prunable"]]
    assert {"rnn.weight_ih_l0", "rnn.weight_hh_l0"} <= {ly["name"] for ly in prunable}
    size = sum(ly["numel"] for ly in prunable)
    assert sum(ly["active"] for ly in prunable) == round(0.25 * size) and s["realized_sparsity"] == pytest.approx(
        0.75, abs=0.5 / size)
    weights, masks = load_file(str(out / "weights.safetensors")), load_file(str(out / "masks.safetensors"))
    for ly in prunable:
        assert int(masks[ly["name"]].sum()) == ly["active"]
        assert (weights[ly["name"]][masks[ly["name"]] == 0] == 0).all()
    updates = [json.loads(line) for line in (out / "updates.jsonl").read_text().splitlines()]
    assert len(updates) >= 3  # the initial mask and the updates at steps 4, 8 (12 is the last step)
    assert s["flops"]["per_token"]["tokens_per_sample"] == 16
    # RigL keeps f_S fixed: steps 1..T_end cost (3·f_S·ΔT + 2·f_S + f_D)/(ΔT + 1), later steps 3·f_S (per sample)
    inf, t = s["flops"]["inference"], s["flops"]["training"]
    f_s, f_d, end = inf["sparse_macs"], inf["dense_macs"], t["update_end_step"]
    assert end == 9 and t["update_interval"] == 4
    per_sample = end * (3 * f_s * 4 + 2 * f_s + f_d) / 5 + (12 - end) * 3 * f_s
    assert t["flops_per_example"] == pytest.approx(2 * per_sample)
    assert t["flops_per_token"] == pytest.approx(2 * per_sample / 16)


@pytest.mark.slow
@pytest.mark.parametrize("model", ["char-gru", "char-transformer"])
def test_exported_sequence_models_validate_in_onnx_runtime(cli, corpus, tmp_path, model):
    run = tmp_path / model
    res = cli(["train", "--model", model, "--data", f"text:{corpus}", "--method", "static", "--sparsity", "0.75",
               "--model-kwargs", "width=0.0625", "--seq-len", "16", "--steps", "3", "--batch-size", "8",
               "--optimizer", "adam", "--out", str(run), "--quiet"])
    assert res.exit_code == 0, res.stderr
    res = cli(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "exp"), "--json"])
    assert res.exit_code == 0, res.stderr + res.stdout
    import onnxruntime as ort

    samples = np.load(run / "samples.npz")
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {sess.get_inputs()[0].name: samples["x"]})[0]
    assert got.shape == samples["logits"].shape == (len(samples["x"]), 16, 256)
    assert np.max(np.abs(got - samples["logits"])) <= 1e-5 * max(1.0, float(np.max(np.abs(samples["logits"]))))
    # compact-onnx removes the units that lost their connections (validated like every format), or says
    # in one line that none can go
    res = cli(["export", str(run), "--format", "compact-onnx", "--out", str(tmp_path / "c")])
    said = res.stderr + res.stdout
    assert (res.exit_code == 0 and "removed" in said) or (res.exit_code == 2 and "nothing was written" in said)


def test_lm_task_loss_accuracy_and_eval_batch():
    task = get_task("language-modeling")
    out = torch.zeros(2, 4, 3)
    out[0, :, 1] = 5.0  # window 0 predicts symbol 1 everywhere
    y = torch.tensor([[1, 1, 0, 0], [2, 2, 2, 2]])
    assert task.correct(out, y) == pytest.approx(0.5)  # window 0: 2/4 right; window 1: argmax 0 ≠ 2
    assert task.loss_sum(out, y) == pytest.approx(2 * float(task.loss(out, y)))
    assert task.extra_metrics(math.log(2))["test_bpc"] == pytest.approx(1.0)
    assert task.eval_batch_size(1024, torch.zeros(8, 512)) == 64
    assert get_task("classification").eval_batch_size(1024, torch.zeros(8, 512)) == 1024


def test_embeddings_stay_dense_unless_asked():
    model = _tiny_gru()
    assert "embed.weight" not in prunable_weights(model)
    settings = SparsitySettings(sparsity=0.75, total_steps=1, distribution="uniform", dense_first_layer=False,
                                include_embeddings=True)
    sp = Sparsifier(model, None, make_method("static"), settings)
    emb = next(ly for ly in sp.layers if ly.name == "embed.weight")
    assert emb.active == emb.numel // 4 and (model.embed.weight[~emb.mask] == 0).all()
    assert build_config(None, {"sparse_embeddings": True}, {}).sparse_embeddings is True
