"""DD-Ranking's scores of a distilled set from its accuracies against the references (docs/METHODS.md
§6.1): LRS (label-robust; DD-Ranking 0.1's DDRS) and ARS (augmentation-robust), both mapped to [0, 1]."""

from __future__ import annotations

import math


def _unit_score(x: float) -> float:
    """DD-Ranking's normalisation (e^x - e^-1) / (e - e^-1): x in [-1, 1] -> [0, 1]."""
    return round((math.exp(x) - math.exp(-1.0)) / (math.e - math.exp(-1.0)), 4)


def lrs(ior: float, hlr: float, w: float = 0.5) -> float:
    """Label-robust score, DD-Ranking 0.2's LRS (its 0.1 name: DDRS; `ddranking/metrics/hard_label.py`,
    docs `doc/metrics/lrs-hard-label.md`): alpha = w IOR - (1 - w) HLR with the accuracies as
    fractions, LRS = (e^alpha - e^-1) / (e - e^-1), in [0, 1]; w = 0.5 (their `lrs_lambda`
    default) weighs both equally. IOR and HLR come in % (as mgd3 writes them)."""
    return _unit_score(w * ior / 100.0 - (1.0 - w) * hlr / 100.0)


ddrs = lrs  # the name before DD-Ranking 0.2


def ars(ior_aug: float, ior_plain: float, w: float = 0.5) -> float:
    """Augmentation-robust score, DD-Ranking 0.2's ARS (`ddranking/metrics/aug_robust.py`, docs
    `doc/metrics/ars.md`): beta = w (syn - random, trained with augmentation) + (1 - w) (syn -
    random, without), accuracies as fractions, ARS = (e^beta - e^-1) / (e - e^-1); w = 0.5 (their
    `ars_lambda` default). mgd3: with augmentation = the dc-dsa protocol, without = dc; the two
    IORs come in %."""
    return _unit_score(w * ior_aug / 100.0 + (1.0 - w) * ior_plain / 100.0)
