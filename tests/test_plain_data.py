"""from_plain: dataclasses back from the JSON that dataclasses.asdict made of them."""
import dataclasses
import json
from typing import Dict, List, Optional, Tuple

import pytest

from occamnets.plain_data import from_plain


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    value: float


@dataclasses.dataclass
class Tree:
    leaf: Leaf
    maybe: Optional[Leaf]
    union: Leaf | None
    leaves: List[Leaf]
    by_name: Dict[str, Leaf]
    sizes: Tuple[int, ...]
    pair: Tuple[str, int]
    optional_numbers: Optional[List[Optional[float]]] = None
    later: int = 7            # a field newer than the data


def test_every_annotation_round_trips_through_json():
    tree = Tree(Leaf("a", 1.5), None, Leaf("u", 2.0), [Leaf("b", 2.0), Leaf("c", -1.0)],
                {"d": Leaf("d", 0.25)}, (1, 2, 3), ("x", 4), [0.5, None])
    plain = json.loads(json.dumps(dataclasses.asdict(tree)))
    assert from_plain(Tree, plain) == tree
    del plain["later"]
    assert from_plain(Tree, plain).later == 7            # missing: the default
    assert from_plain(Tree, plain, leaf=Leaf("given", 0)).leaf == Leaf("given", 0)
    with pytest.raises(ValueError, match="Tree has no field colour"):
        from_plain(Tree, dict(plain, colour="red"))
