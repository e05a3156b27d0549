"""What each output of a model means: output index -> dataset category (id, name).

Index 0 is the background. A model trained by the pipeline records its train shards'
categories in their manifest order (index 1..K, by COCO id); a torchvision COCO model uses
COCO's category ids as its output indices (91 outputs, the ids COCO skipped included, as
torchvision's ``maskrcnn_resnet50_fpn`` has them). Checkpoints carry the map under
``"label_map"`` as ``[{"index", "id", "name"}, ...]``.

:func:`match_categories` decides which output serves which category of another dataset:
by id where ids and names agree (names compared without case and underscores), by name
where the ids disagree; the same id under another name is another category. Evaluation
uses it to score a model on a dataset whose ids are not its own, ``train.init_from`` to
keep the predictor rows of the categories a dataset shares with the weights it starts from.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torchvision.models._meta import _COCO_CATEGORIES

LABEL_MAP_KEY = "label_map"
# How many category names one message lists.
SHOWN = 6


@dataclass(frozen=True)
class Category:
    index: int
    """The model's output index (1..num_classes-1)."""
    id: int
    """The dataset's category id."""
    name: str


class LabelMapError(ValueError):
    """A label map that is malformed or does not fit; the message is one line."""


def _key(name: str) -> str:
    return " ".join(str(name).lower().replace("_", " ").split())


@dataclass(frozen=True)
class LabelMap:
    num_classes: int
    """Outputs including the background (index 0)."""
    categories: tuple[Category, ...]
    """The outputs that mean a category, by index; outputs without one (the ids COCO skipped
    in torchvision's model) are never reported."""

    def __post_init__(self) -> None:
        indices = [c.index for c in self.categories]
        if any(not 1 <= i < self.num_classes for i in indices) or len(set(indices)) != len(indices):
            raise LabelMapError(
                f"label map: indices {indices[:SHOWN]} are not distinct values in "
                f"1..{self.num_classes - 1}"
            )

    # ---- construction ----

    @classmethod
    def from_categories(cls, categories: Iterable[Mapping], num_classes: int | None = None):
        """From a shard manifest's categories (``{"id", "name", "index"}``)."""
        entries = tuple(
            Category(int(c["index"]), int(c["id"]), str(c["name"]))
            for c in sorted(categories, key=lambda c: int(c["index"]))
        )
        return cls(num_classes or len(entries) + 1, entries)

    @classmethod
    def torchvision_coco(cls) -> LabelMap:
        """torchvision's COCO models: output index = COCO category id (91 outputs)."""
        entries = tuple(
            Category(i, i, name) for i, name in enumerate(_COCO_CATEGORIES) if i and name != "N/A"
        )
        return cls(len(_COCO_CATEGORIES), entries)

    @classmethod
    def from_json(cls, data: object, num_classes: int, where: str) -> LabelMap:
        """The map a checkpoint recorded; a LabelMapError naming ``where`` if malformed."""
        try:
            entries = tuple(
                Category(int(e["index"]), int(e["id"]), str(e["name"]))
                for e in data  # type: ignore[union-attr]
            )
            return cls(int(num_classes), entries)
        except (KeyError, TypeError, ValueError) as error:
            raise LabelMapError(f"{where}: malformed label_map ({error})") from None

    def to_json(self) -> list[dict]:
        return [{"index": c.index, "id": c.id, "name": c.name} for c in self.categories]

    # ---- lookups ----

    def names_by_index(self) -> list[str]:
        """A name for every output index ("__background__" at 0, "class_I" where none)."""
        names = ["__background__"] + [f"class_{i}" for i in range(1, self.num_classes)]
        for c in self.categories:
            names[c.index] = c.name
        return names

    def ids_by_index(self) -> dict[int, int]:
        return {c.index: c.id for c in self.categories}

    def describe(self) -> str:
        shown = ", ".join(f"{c.name} ({c.id})" for c in self.categories[:SHOWN])
        more = f", ... (+{len(self.categories) - SHOWN})" if len(self.categories) > SHOWN else ""
        return f"{len(self.categories)} categories: {shown}{more}"


@dataclass
class CategoryMatch:
    """How a model's outputs (``LabelMap``) serve a dataset's categories."""

    index_to_id: dict[int, int] = field(default_factory=dict)
    """Model output index -> dataset category id, for every matched category."""
    by_id: list[str] = field(default_factory=list)
    by_name: list[str] = field(default_factory=list)
    """``"name (id A -> model id B)"`` for categories matched by name across differing ids."""
    missing: list[Mapping] = field(default_factory=list)
    """Dataset categories no output serves."""

    def summary(self) -> str:
        parts = [f"{len(self.index_to_id)} matched ({len(self.by_id)} by id"]
        if self.by_name:
            parts.append(f", by name: {', '.join(self.by_name[:SHOWN])}")
        parts.append(")")
        if self.missing:
            parts.append(f"; unmatched: {missing_names(self.missing)}")
        return "".join(parts)


def missing_names(categories: Sequence[Mapping]) -> str:
    """``'hexagon' (id 42, the model's 'surfboard'), ...`` for unmatched categories."""
    shown = ", ".join(
        f"{c['name']!r} (id {c['id']}"
        + (f", the model's {c['model_name']!r})" if "model_name" in c else ")")
        for c in categories[:SHOWN]
    )
    return shown + (f", ... (+{len(categories) - SHOWN})" if len(categories) > SHOWN else "")


def match_categories(label_map: LabelMap, dataset: Iterable[Mapping]) -> CategoryMatch:
    """Which output of ``label_map`` serves each dataset category (``{"id", "name"}``): the
    one with the same id and name, else the one with the same name."""
    by_id = {c.id: c for c in label_map.categories}
    by_name: dict[str, Category] = {}
    for c in label_map.categories:
        by_name.setdefault(_key(c.name), c)
    match = CategoryMatch()

    def free(c: Category | None) -> Category | None:  # one output serves one category
        return c if c is not None and c.index not in match.index_to_id else None

    for category in dataset:
        cid, name = int(category["id"]), str(category["name"])
        same_id, same_name = free(by_id.get(cid)), free(by_name.get(_key(name)))
        if same_id is not None and _key(same_id.name) == _key(name):
            match.by_id.append(name)
            found = same_id
        elif same_name is not None:
            match.by_name.append(f"{name} (id {cid} -> model id {same_name.id})")
            found = same_name
        else:
            # The same id under another name is another category (a dataset numbered 1..K
            # is not COCO): refused, with the model's name said.
            other = by_id.get(cid)
            note = {"model_name": other.name} if other is not None else {}
            match.missing.append({"id": cid, "name": name, **note})
            continue
        match.index_to_id[found.index] = cid
    return match
