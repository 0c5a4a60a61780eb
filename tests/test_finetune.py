"""`mgd3 finetune --objective minimax` (MinMax diffusion, Gu et al. 2024): the loss terms on a
small analytic case, the memories, and the CLI end to end on the tiny digits DiT — a folder that
`mgd3 distill` loads and samples from, with only the DiffFit parameters changed."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from mgd3.cli import main
from mgd3.train.finetune import MinimaxMemory, cosine_matrix, diversity, mark_trainable, representativeness


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    lines = [e for e in err if e.startswith("mgd3: error:")]
    assert len(lines) == 1 and "Traceback" not in "\n".join(err), err
    return lines[0]


def test_terms_on_an_analytic_case():
    e1, e2 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    diag = torch.tensor([1.0, 1.0])  # 45° from both axes
    torch.testing.assert_close(cosine_matrix(torch.stack([e1, diag]), torch.stack([e1, e2])),
                               torch.tensor([[1.0, 0.0], [1 / math.sqrt(2), 1 / math.sqrt(2)]]))
    # representativeness: 1 − the least similarity over every (prediction, real) pair
    real = torch.stack([e1, 3 * e2])  # scale does not matter
    assert representativeness(diag[None], real).item() == pytest.approx(1 - 1 / math.sqrt(2))
    assert representativeness(torch.stack([e1, diag]), real).item() == pytest.approx(1.0)  # (e1, e2): cos 0
    # diversity: the largest similarity to an earlier prediction
    assert diversity(torch.stack([e1, diag]), torch.stack([-e1, 2 * e2])).item() == pytest.approx(1 / math.sqrt(2))
    # images are flattened: (B, C, h, w) works like vectors
    assert representativeness(diag.view(1, 2, 1, 1), real.view(2, 2, 1, 1)).item() == pytest.approx(
        1 - 1 / math.sqrt(2))


def test_memory_weights_order_and_fifo():
    e1, e2, diag = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    mem = MinimaxMemory(size=2)
    # first sight of a class: no terms, the batch only enters the memories
    rep, div = mem.terms(torch.stack([e1, e2]), torch.stack([e1, e2]), torch.tensor([0, 1]), 0.1, 0.2)
    assert rep.item() == 0 and div.item() == 0
    assert [len(mem.real[c]) for c in (0, 1)] == [1, 1]
    # class 0 against real {e1} and pseudo {e1}; class 1 against real {e2} and pseudo {e2}; two classes
    pred = torch.stack([diag, e1, diag]).requires_grad_(True)
    rep, div = mem.terms(pred, torch.stack([e2, e2, e1]), torch.tensor([0, 0, 1]), 0.1, 0.2)
    c45 = 1 / math.sqrt(2)
    # class 0: min cos over {diag, e1} x {e1} = c45, max = 1; class 1: diag vs e2 -> c45 both
    assert rep.item() == pytest.approx(0.1 * ((1 - c45) + (1 - c45)) / 2)
    assert div.item() == pytest.approx(0.2 * (1 + c45) / 2)
    (rep + div).backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    # FIFO of size 2: class 0 held e1, then got e2, e2 -> the last two
    assert [m.tolist() for m in mem.real[0]] == [[0.0, 1.0], [0.0, 1.0]]
    assert not any(m.requires_grad for m in mem.pseudo[0])  # predictions enter detached


def test_difffit_selection():
    from diffusers import DiTTransformer2DModel

    m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                              num_layers=1, sample_size=4, patch_size=2, num_embeds_ada_norm=3)
    n = mark_trainable(m, "difffit")
    names = {k for k, p in m.named_parameters() if p.requires_grad}
    assert all(k.endswith("bias") or "class_embedder" in k for k in names)
    assert any("class_embedder" in k for k in names) and n < sum(p.numel() for p in m.parameters())
    assert mark_trainable(m, "all") == sum(p.numel() for p in m.parameters())


def test_finetune_minimax_end_to_end(digits_model, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(digits_model), "--objective", "minimax", "--data", "digits", "--classes", "0",
                 "1", "--out", str(out), "--steps", "4", "--batch-size", "4", "--ema-decay", "0", "--quiet"]) == 0
    meta = json.loads((out / "mgd3.json").read_text())
    assert meta["finetune"]["objective"] == "minimax" and meta["finetune"]["config"]["steps"] == 4
    assert meta["finetune"]["data"] == "digits" and meta["finetune"]["classes"] == ["0", "1"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "minimax" in card and "Steps: 4" in card and "digits" in card
    base = load_file(digits_model / "transformer" / "diffusion_pytorch_model.safetensors")
    new = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == new.keys()
    changed = {k for k in base if not torch.equal(base[k], new[k])}
    assert changed and all(k.endswith("bias") or "class_embedder" in k for k in changed)
    # the folder is a model `mgd3 distill` samples from
    s = tmp_path / "set"
    assert main(["distill", "--model", str(out), "--data", "digits", "--classes", "0", "1", "--method", "plain",
                 "--ipc", "2", "--steps", "3", "--out", str(s), "--quiet"]) == 0
    assert len(json.loads((s / "manifest.json").read_text())["images"]) == 4
    capsys.readouterr()
    # a second run into the finished folder needs --overwrite
    assert main(["finetune", str(digits_model), "--data", "digits", "--out", str(out), "--steps", "1",
                 "--quiet"]) == 2
    assert "--overwrite" in _one_error_line(capsys)


def test_finetune_bad_input(digits_model, tmp_path, capsys):
    out = tmp_path / "ft"
    assert main(["finetune", str(digits_model), "--objective", "maximin", "--data", "digits", "--out",
                 str(out)]) == 2
    assert "unknown --objective 'maximin'; known: minimax" in _one_error_line(capsys) and not out.exists()
    assert main(["finetune", str(digits_model), "--data", "digits", "--out", str(digits_model), "--steps", "1"]) == 2
    assert "is the model folder" in _one_error_line(capsys)
    assert main(["finetune", str(digits_model), "--data", "digits", "--out", str(out), "--steps", "0"]) == 2
    assert "--steps" in _one_error_line(capsys)
    assert main(["finetune", str(tmp_path / "nope"), "--data", "digits", "--out", str(out)]) == 2
    _one_error_line(capsys)
