"""benchmarks/imagenet1k_recipe.py: the ImageNet-1K soft-label recipe's dry run (the same command
lines as the real recipe, with tiny models, 3 digits classes and 2 CPU processes) runs end to
end, and the real recipe's commands are the documented ones."""

import importlib.util

import pytest

from conftest import ROOT


def _recipe():
    spec = importlib.util.spec_from_file_location("imagenet1k_recipe", ROOT / "benchmarks" / "imagenet1k_recipe.py")
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    return m


def test_recipe_commands_for_two_nodes(capsys):
    m = _recipe()
    assert m.main(["--nodes", "2", "--gpus-per-node", "8", "--node-rank", "1", "--rdzv-endpoint", "n0:29500",
                   "--data-root", "/d/in1k", "--class-map", "w.txt"]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if not x.startswith("#")]
    assert len(lines) == 4  # distill and evaluate, IPC 10 then 50
    launch = ("-m torch.distributed.run --nnodes 2 --nproc-per-node 8 --node-rank 1 --rdzv-backend c10d "
              "--rdzv-endpoint n0:29500 --rdzv-id mgd3-in1k -m mgd3")
    assert all(launch in x for x in lines)
    assert "distill --data /d/in1k --class-map w.txt --out runs/in1k-mgd3-ipc10 --ipc 10 --method mgd3 " \
           "--model facebook/DiT-XL-2-256" in lines[0]
    assert lines[3].endswith("evaluate runs/in1k-mgd3-ipc50 --data /d/in1k --class-map w.txt --protocol soft "
                             "--arch resnet-18 --device cuda --bf16 --quiet --seeds 0 1 2")


@pytest.mark.slow
def test_recipe_dry_run(tmp_path, capsys):
    """Four torchrun launches of 2 processes: distill IPC 1 -> evaluate (DDP), distill IPC 2 ->
    evaluate (seeds over processes), soft labels from a ResNet-18 teacher."""
    assert _recipe().main(["--dry-run", "--work", str(tmp_path)]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "IPC 10 (dry: 1): 3 images" in out and "(ddp;" in out
    assert "IPC 50 (dry: 2): 6 images" in out and "(seeds;" in out
