"""YAML and JSON read strictly: a key given twice and a document nested absurdly deep are refused.

PyYAML and json keep the last of two equal keys without a word (`id: t1` then `id: t2` creates
t2), and both parse nesting by recursion, so `[[[[...` 100,000 deep ends in a RecursionError
rather than a message. kubectl refuses duplicate keys; so does maiactl, naming the key (and, in
YAML, its line). Manifests, the config file and problem files are a few levels deep; YAML deeper
than `MAX_DEPTH` is refused at the line it goes past it, JSON at Python's recursion limit.

JSON (problem files, `.json` manifests) is read by the scheduler library's own strict reader,
`scheduler.interchange.document_from_json` (a ProblemError naming the key given twice), which
`json_document` wraps, rather than by a second copy of it here.
"""
from __future__ import annotations

import functools
import json
import re
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import yaml

# Nesting of YAML collections accepted: far more than any manifest (a List of Deployments with
# their status is 5 deep), far less than recursion in the composer allows.
MAX_DEPTH = 100


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


class JsonError(ValueError):
    """JSON that cannot be read: `str()` is the one line saying why ("invalid JSON at line ...")."""


# A JSON string, with the colon after it when it is a key, or a bracket: what `_json_problem` follows.
_JSON_TOKEN = re.compile(r'("(?:[^"\\]|\\.)*")(\s*:)?|[\[\]{}]')


def _json_problem(text: str, max_depth: int | None) -> tuple[int, str] | None:
    """Where `text` first goes deeper than `max_depth` or gives a key twice in one object, and
    which (the offset, the problem); None for neither. It only finds the place of what the
    strict reader refused (or, with `max_depth`, what it would read): the reader decides."""
    keys: list[set[str] | None] = []  # the keys so far of each open object; None for an array
    for token in _JSON_TOKEN.finditer(text):
        string, colon = token.groups()
        if string is None:
            if token.group() in "[{":
                keys.append(set() if token.group() == "{" else None)
                if max_depth is not None and len(keys) > max_depth:
                    return token.start(), f"nested deeper than {max_depth} levels"
            elif keys:
                keys.pop()
        elif colon and keys and keys[-1] is not None:
            try:
                key = json.loads(string)
            except ValueError:  # a bad escape: the reader says so
                continue
            if key in keys[-1]:
                return token.start(), f"duplicate key {key!r} in an object (each key at most once)"
            keys[-1].add(key)
    return None


def _invalid(text: str, found: tuple[int, str] | None, problem: str) -> JsonError:
    """JsonError for `problem`, at the line and column of `found` (its problem then) when found."""
    if found is None:
        return JsonError(f"invalid JSON: {problem}")
    at, problem = found
    line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
    return JsonError(f"invalid JSON at line {line} column {column}: {problem}")


def json_document(text: str, what: str = "document", max_depth: int | None = None) -> Any:
    """The JSON document `text`, read by the scheduler library's strict reader
    (`document_from_json`: a key given twice is refused); JsonError saying why not, with the line
    and column. `max_depth`: nesting beyond it is refused too, as YAML's (small documents:
    manifests); `what` names the document when it is nested past Python's recursion limit."""
    from scheduler.errors import ProblemError
    from scheduler.interchange import document_from_json  # here: its module brings jsonschema

    try:
        document = document_from_json(text)
    except json.JSONDecodeError as exc:
        raise JsonError(f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except ProblemError as exc:  # a key given twice: an object names each field once
        raise _invalid(text, _json_problem(text, None), str(exc)) from None
    except ValueError as exc:  # an integer literal past Python's digit limit (4,300)
        raise JsonError(f"cannot read its JSON: {exc}") from None
    except RecursionError:
        found = _json_problem(text, max_depth) if max_depth is not None else None
        raise _invalid(text, found, f"nested too deeply for a {what}") from None
    if max_depth is not None and (found := _json_problem(text, max_depth)) is not None:
        raise _invalid(text, found, "")
    return document
