"""YAML and JSON read strictly: a key given twice and a document nested absurdly deep are refused.

PyYAML and json keep the last of two equal keys without a word (`id: t1` then `id: t2` creates
t2), and both parse nesting by recursion, so `[[[[...` 100,000 deep ends in a RecursionError
rather than a message. kubectl refuses duplicate keys; so does maiactl, naming the key and its
line. Manifests, the config file and problem files are a few levels deep; YAML deeper than
`MAX_DEPTH` is refused at the line it goes past it, JSON at Python's recursion limit.
"""
from __future__ import annotations

import functools
import json
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

# Nesting of YAML collections accepted: far more than any manifest (a List of Deployments with
# their status is 5 deep), far less than recursion in the composer allows.
MAX_DEPTH = 100


class DuplicateKey(ValueError):
    """A JSON object gives one key twice."""


@functools.cache
def strict_yaml_loader() -> type[yaml.SafeLoader]:
    """yaml.SafeLoader refusing duplicate keys and nesting beyond `MAX_DEPTH` (yaml.MarkedYAMLError,
    with the line). Made (and yaml imported) on first use, not with maiactl."""
    import yaml
    from yaml.composer import ComposerError
    from yaml.constructor import ConstructorError

    class StrictLoader(yaml.SafeLoader):
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.depth >= MAX_DEPTH:
                raise ComposerError(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            self.depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            # The mapping's own keys, before `<<` merges are flattened in (a key there may override them).
            first: dict[Any, Any] = {}
            if isinstance(node, yaml.MappingNode):
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        earlier = first.setdefault(key, key_node.start_mark)
                    except TypeError:  # unhashable: the SafeLoader says so below
                        continue
                    if earlier is not key_node.start_mark:
                        raise ConstructorError(None, None, f"duplicate key {key!r} (first on line {earlier.line + 1})",
                                               key_node.start_mark)
            return super().construct_mapping(node, deep)

    return StrictLoader


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for key, value in pairs:
        if key in document:
            raise DuplicateKey(f"duplicate key {key!r} in an object (each key at most once)")
        document[key] = value
    return document


def strict_json(text: str) -> Any:
    """json.loads refusing an object with a key twice (`DuplicateKey`); RecursionError when nested
    deeper than Python's recursion limit; json.JSONDecodeError and ValueError as json.loads."""
    return json.loads(text, object_pairs_hook=_unique_keys)
