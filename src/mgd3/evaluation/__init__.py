"""Stage: evaluation — score a distilled set the way papers do (docs/METHODS.md §5).

A distilled set on disk + real data -> fresh networks trained under a protocol (`protocols`:
dc, dc-dsa, minimax, soft) -> test accuracy, mean ± std over seeds, in eval.json. Evaluation
knows nothing of diffusion: any tool's set in the mgd3 layout (or a plain ImageFolder) works.

Modules: `networks` (ConvNet-3/6, ResNetAP-10, ResNet-18, instance norm), `augment` (DSA,
ImageNet transforms, CutMix), `protocols`, `train` (the loop), `references` (random-real /
full references and the soft-label teacher, cached), `core` (set -> eval.json). The command line is `mgd3.cli.evaluate`.
"""

from mgd3.evaluation.core import EvalConfig, evaluate, evaluate_reference, evaluate_set, read_set
from mgd3.evaluation.networks import NETWORKS, build_network
from mgd3.evaluation.protocols import PROTOCOLS, Protocol, get_protocol, resolve

__all__ = ["EvalConfig", "evaluate", "evaluate_set", "evaluate_reference", "read_set", "NETWORKS",
           "build_network", "PROTOCOLS", "Protocol", "get_protocol", "resolve"]
