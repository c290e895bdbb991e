"""Bias groups: every distinct (label, bias-attribute values) combination of a split is a group.

This is the official code's Biased MNIST grouping (its GroupUtils names a group by the digit
and every bias variable's value). The official numbers groups in the order it first meets
them; here the numbering is a function of the groups alone: sorted by label, then by how many
attributes are bias-conflicting (when the data says which values are aligned with the class:
the bias-aligned group of a class first), then by the values. Without that (CelebA's gender, a
user's CSV) the order is label, then values: CelebA's official 2 * blond + male. Only PGI's
split of a class's groups into two halves reads the numbering (see occamnets/methods/pgi.py):
where aligned values are known this order puts the majority-like half first; without them
the halves follow the values' order, not the groups' sizes.
"""
import dataclasses
from typing import List, Optional, Sequence

import torch
from torch import Tensor


@dataclasses.dataclass(frozen=True)
class BiasGroups:
    """index (N,) long: each item's group; keys (G, 1 + F) long: each group's label, then its
    value of every attribute in `columns[1:]`; sizes (G,) long: items per group;
    value_names: per attribute, the names of its values (a CSV's 'land', 'water'), or None
    where they are the numbers."""
    index: Tensor
    keys: Tensor
    sizes: Tensor
    columns: Sequence[str]
    value_names: Optional[Sequence[Optional[Sequence[str]]]] = None

    @property
    def count(self) -> int:
        return self.keys.shape[0]

    def names(self, class_names: Optional[Sequence[str]] = None) -> List[str]:
        """"label=3, digit_color=3, ..." per group, in group order ("dog, background=1" with
        class_names; "dog, place=water" with value_names)."""
        return [self._name(key, class_names) for key in self.keys.tolist()]

    def name(self, group: int, class_names: Optional[Sequence[str]] = None) -> str:
        return self._name(self.keys[group].tolist(), class_names)

    def _name(self, key: List[int], class_names: Optional[Sequence[str]]) -> str:
        values = [None] + list(self.value_names or [None] * (len(key) - 1))
        parts = [f"{c}={v if named is None else named[v]}"
                 for c, v, named in zip(self.columns, key, values)]
        if class_names:
            parts[0] = class_names[key[0]]
        return ", ".join(parts)



def bias_groups(labels: Tensor, attributes: Tensor, attribute_names: Sequence[str],
                aligned: Optional[Tensor] = None,
                value_names: Optional[Sequence[Optional[Sequence[str]]]] = None) -> BiasGroups:
    """The groups of items with `labels` (N,) and bias `attributes` (N, F) integer values;
    `aligned` (N, F) bool: which values are the one tied to the item's class (None: not
    known, the groups are ordered by their values alone); `value_names`: per attribute, its
    values' names, or None (the numbers)."""
    if value_names is not None and len(value_names) != len(attribute_names):
        raise ValueError(f"{len(value_names)} lists of value names for "
                         f"{len(attribute_names)} attributes")
    if labels.dim() != 1 or attributes.dim() != 2 or attributes.shape[0] != labels.shape[0]:
        raise ValueError(f"labels must be (N,) and attributes (N, F), got "
                         f"{tuple(labels.shape)} and {tuple(attributes.shape)}")
    if attributes.shape[1] != len(attribute_names):
        raise ValueError(f"{attributes.shape[1]} attribute columns but "
                         f"{len(attribute_names)} names")
    if aligned is not None and aligned.shape != attributes.shape:
        raise ValueError(f"aligned must have the attributes' shape {tuple(attributes.shape)}, "
                         f"got {tuple(aligned.shape)}")
    labels, attributes = labels.long(), attributes.long()
    conflicting = (torch.zeros_like(labels)[:, None] if aligned is None
                   else (~aligned.bool()).sum(1, keepdim=True))
    order_keys = torch.cat([labels[:, None], conflicting, attributes], 1)
    if labels.shape[0] == 0:
        unique = order_keys
        index = torch.zeros(0, dtype=torch.long, device=labels.device)
        sizes = torch.zeros(0, dtype=torch.long, device=labels.device)
    else:
        unique, index, sizes = torch.unique(order_keys, dim=0, return_inverse=True,
                                            return_counts=True)
    keys = torch.cat([unique[:, :1], unique[:, 2:]], 1)
    return BiasGroups(index, keys, sizes, ("label", *attribute_names), value_names)
