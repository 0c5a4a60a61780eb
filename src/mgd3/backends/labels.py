"""Which label of a model each data class is: a class-conditional model's labels are matched by
name (its id2label), a text-to-image model takes the data's class names as its classes."""

from __future__ import annotations

from mgd3.backends.base import Backend
from mgd3.errors import Mgd3Error


def _synonyms(text: str) -> list[str]:
    """'tench, Tinca tinca' -> ['tench', 'tinca tinca']."""
    return [p.strip() for p in text.strip().lower().split(",") if p.strip()]


def map_labels(data, backend: Backend) -> list[int]:
    """The model label of every data class: from the data (subset tables, --class-map), else by
    name against the model's id2label (the full name first, then a synonym that names one label
    only), else by position when the model has no names and the same number of classes."""
    full = {text.strip().lower(): label for label, text in backend.id2label.items()}
    owners: dict[str, set[int]] = {}
    for label, text in backend.id2label.items():
        for n in _synonyms(text):
            owners.setdefault(n, set()).add(label)
    labels = []
    for c, cid in enumerate(data.class_ids):
        known = data.labels[c]
        for text in (data.class_names[c], cid):
            if known is not None:
                break
            known = full.get(text.strip().lower())
            if known is None:
                hits = {label for n in _synonyms(text) for label in owners.get(n, ())}
                known = hits.pop() if len(hits) == 1 else None
        if known is None and not backend.id2label and len(data.class_ids) == backend.num_classes:
            known = c
        if known is None:
            raise Mgd3Error(
                f"cannot tell which label of model {backend.path.name} class {cid!r} is (no name match in "
                "its id2label); pass --class-map FILE with lines 'CLASS_ID LABEL'")
        labels.append(int(known))
    return labels


def class_labels(data, backend: Backend, prompt: str | None = None,
                 negative_prompt: str | None = None) -> list[int]:
    """A text-conditional backend (`set_classes`) takes the data's class names as its classes
    (label i = class i, prompted by its name); a class-conditional one maps names to its labels."""
    if callable(getattr(backend, "set_classes", None)):
        return backend.set_classes(list(data.class_names), prompt=prompt, negative_prompt=negative_prompt)
    if prompt is not None or negative_prompt is not None:
        raise Mgd3Error(f"--prompt and --negative-prompt need a text-to-image model; {backend.path.name} "
                        f"({backend.name}) is class-conditional")
    return map_labels(data, backend)
