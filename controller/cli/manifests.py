"""YAML manifests (kinds Tenant, Topology, Deployment) turned into API messages.

A manifest is checked completely on the client before anything is sent, and every problem is
reported with its file, document number, object and field path, e.g.

    deploy/x.yaml document 2 (Deployment 'foo'): shard.accelerators: expected an integer, got 'four'

Unknown fields are errors (a misspelt `min_replica` silently ignored is worse than a refusal),
as are a key given twice in one mapping and nesting deeper than any manifest (`loading`), numbers
the API's field cannot hold and an object given twice in one set of manifests
(`load_manifest_sources`). The vocabulary is the interchange format's (snake_case fields,
lowercase enum words).

JSON is read as JSON, not as YAML (which refuses the tabs JSON may indent with, reads `1e3` as a
string and lets a trailing comma pass), and its errors say "invalid JSON" with the line and
column: a file named `*.json`, and stdin or a file of another name (not `*.yaml`, `*.yml`) whose
text starts with `{`, as kubectl tells JSON from YAML; such text that is no JSON is read as YAML
(flow style), and said to be invalid JSON only when it is no YAML either.
"""
from __future__ import annotations

import difflib
import math
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from controller import limits
from controller.cli.bounds import int_range
from controller.cli.config import not_utf8
from controller.cli.loading import MAX_DEPTH, JsonError, json_document, strict_yaml_loader
from controller.cli.refs import deployment_name
from controller.cli.vocab import DOMAIN_BY_WORD, ISOLATION_BY_WORD
from maia.v1 import admin_pb2, common_pb2, deployments_pb2

KINDS = ("Tenant", "Topology", "Deployment")
# From deployments.proto: unique in the cluster, DNS-label-like, at most 63 characters.
NAME_PATTERN = re.compile(limits.NAME_PATTERN)
NAME_MAX = limits.NAME_MAX


class ManifestError(Exception):
    """Malformed manifests; `problems` holds one precise line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class ManifestObject:
    """One parsed document: its kind, name, where it came from and the API message."""

    kind: str
    name: str
    source: str
    message: Message

    @property
    def ref(self) -> str:
        """'tenant/anthropic', 'deployment/claude-serving', 'topology'."""
        return f"{self.kind.lower()}/{self.name}" if self.name else self.kind.lower()

    @property
    def name_line(self) -> str:
        """As `-o name` prints it, which by-name commands read back: a deployment with its tenant
        ('deployment/anthropic/claude-serving'), as names are per tenant; else `ref`."""
        if self.kind == "Deployment":
            return deployment_name(self.message.tenant, self.name)  # type: ignore[attr-defined]
        return self.ref


MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def expand_sources(sources: Iterable[str | Path]) -> list[str]:
    """FILE, DIR (its *.yaml, *.yml, *.json, sorted, not recursive) or '-' (stdin), in order."""
    out: list[str] = []
    for source in sources:
        path = Path(source)
        if str(source) != "-" and path.is_dir():
            out.extend(str(p) for p in sorted(path.iterdir()) if p.suffix in MANIFEST_SUFFIXES and p.is_file())
        else:
            out.append(str(source))
    return out


def load_manifest_sources(sources: Iterable[str | Path]) -> list[ManifestObject]:
    """Every object of FILEs, DIRs and '-' (stdin); an empty set is an error, as is any problem
    (all reported at once, nothing is sent)."""
    sources = list(sources)
    paths = expand_sources(sources)
    if not paths:
        raise ManifestError([f"{', '.join(map(str, sources))}: no manifest files (*.yaml, *.yml, *.json)"])
    objects = load_manifests(paths)
    if not objects:
        raise ManifestError([f"{', '.join(paths)}: no objects found (empty file, only comments, or a List without "
                             f"items)"])
    duplicates = given_twice(objects)
    if duplicates:
        raise ManifestError(duplicates)
    return objects


def _identities(obj: ManifestObject) -> Iterator[tuple[str, str]]:
    """What `obj` defines, each as (what, where in obj): a deployment by its tenant and name
    (names are per tenant), a tenant by its id, a topology by its zones, rows and racks (several
    Topology documents may each add some)."""
    if obj.kind == "Deployment":
        yield f"deployment {obj.message.tenant}/{obj.name}", obj.source  # type: ignore[attr-defined]
    elif obj.kind == "Tenant":
        yield f"tenant {obj.name}", obj.source
    elif obj.kind == "Topology":
        for part, singular in (("zones", "zone"), ("rows", "row"), ("racks", "rack")):
            for i, item in enumerate(getattr(obj.message, part)):
                yield f"{singular} {item.id}", f"{obj.source}: {part}[{i}]"


def given_twice(objects: Iterable[ManifestObject]) -> list[str]:
    """One line per object defined more than once: apply would write it twice (the last
    silently winning, or the second submit of a deployment failing halfway through the apply)."""
    first: dict[str, str] = {}
    problems: list[str] = []
    for obj in objects:
        for identity, where in _identities(obj):
            if identity in first:
                problems.append(f"{where}: {identity} is given twice (first in {first[identity]})")
            else:
                first[identity] = where
    return problems


def load_manifests(paths: Iterable[str | Path]) -> list[ManifestObject]:
    """Parse every document of every file ('-' reads stdin); raises ManifestError listing all problems."""
    objects: list[ManifestObject] = []
    problems: list[str] = []
    for path in paths:
        try:
            text = sys.stdin.read() if str(path) == "-" else Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            problems.append(f"{path}: cannot read: {exc.strerror or exc}")
            continue
        except UnicodeDecodeError as exc:
            problems.append(f"{path}: cannot read: {not_utf8(exc)}")
            continue
        try:
            objects.extend(parse_manifest_text(text, "<stdin>" if str(path) == "-" else str(path)))
        except ManifestError as exc:
            problems.extend(exc.problems)
    if problems:
        raise ManifestError(problems)
    return objects


def _documents(text: str, source: str) -> list[Any]:
    """The documents of one manifest source, JSON or YAML (the module docstring says which)."""
    suffix = Path(source).suffix
    json_error: JsonError | None = None
    if suffix == ".json" or (suffix not in (".yaml", ".yml") and text.lstrip().startswith("{")):
        try:
            return [json_document(text, "manifest", max_depth=MAX_DEPTH)]
        except JsonError as exc:
            if suffix == ".json":
                raise ManifestError([f"{source}: {exc}"]) from None
            json_error = exc  # stdin may be YAML in flow style, `{kind: Tenant, ...}`
    import yaml  # here, not with maiactl: only manifests need it

    try:
        return list(yaml.load_all(text, Loader=strict_yaml_loader()))
    except yaml.YAMLError as exc:
        if json_error is not None:
            raise ManifestError([f"{source}: {json_error}"]) from None
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError([f"{source}: invalid YAML{where}: {problem}"]) from None


def parse_manifest_text(text: str, source: str) -> list[ManifestObject]:
    """Parse a multi-document YAML string or a JSON document; `source` names it in messages."""
    documents = _documents(text, source)
    objects: list[ManifestObject] = []
    problems: list[str] = []
    for number, document in enumerate(documents, start=1):
        if document is None:
            continue
        where = f"{source} document {number}"
        if isinstance(document, Mapping) and document.get("kind") == "List":
            items = document.get("items")
            if not isinstance(items, list):
                problems.append(f"{where} (List): items: expected a list of objects, got {describe(items)}")
                continue
            parsed = [_parse_document(item, f"{where} item {i}") for i, item in enumerate(items, start=1)]
        else:
            parsed = [_parse_document(document, where)]
        for obj, errors in parsed:
            problems.extend(errors)
            if obj is not None:
                objects.append(obj)
    if problems:
        raise ManifestError(problems)
    return objects


def _parse_document(document: Any, where: str) -> tuple[ManifestObject | None, list[str]]:
    if not isinstance(document, Mapping):
        return None, [f"{where}: expected a mapping with a 'kind', got {describe(document)}"]
    kind = document.get("kind")
    if kind is None:
        return None, [f"{where}: kind: required field is missing (one of {', '.join(KINDS)})"]
    if kind not in KINDS:
        return None, [f"{where}: kind: expected one of {', '.join(KINDS)}, got {describe(kind)}"]
    name_key = {"Tenant": "id", "Deployment": "name"}.get(kind)
    name = document.get(name_key) if name_key else None
    label = f"{where} ({kind} '{name}')" if isinstance(name, str) and name else f"{where} ({kind})"
    fields = Fields(document, "", [], _MESSAGES[kind])
    fields.string("kind")
    fields.ignore("status")  # what `get -o yaml` reports; the server owns it
    message = _PARSERS[kind](fields)
    if fields.errors:
        return None, [f"{label}: {e}" for e in fields.errors]
    return ManifestObject(kind, name if isinstance(name, str) else "", label, message), []


def describe(value: Any) -> str:
    """How a wrong value is quoted in a message: 'four', 1.5, true, null, a list."""
    if isinstance(value, str):
        return f"'{value}'"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


class Fields:
    """Typed reads from one mapping, collecting precise errors instead of raising.

    Every read marks its key as known; `finish()` reports the keys nobody read. `message` is the
    API message the mapping becomes (its fields are named as the keys): an integer is checked
    against its field's range, which protobuf would refuse with a bare ValueError.
    """

    def __init__(self, data: Mapping[str, Any], prefix: str, errors: list[str],
                 message: Descriptor | None = None) -> None:
        self.data = data
        self.prefix = prefix
        self.errors = errors
        self.message = message
        self._known: set[str] = set()

    def _field(self, key: str) -> FieldDescriptor | None:
        """The field of `message` that `key` is read into (None: no message, or no such field)."""
        return self.message.fields_by_name.get(key) if self.message is not None else None

    def _field_range(self, key: str) -> tuple[int, int] | None:
        field = self._field(key)
        return int_range(field) if field is not None else None

    def _nested(self, key: str) -> Descriptor | None:
        """The message type of field `key` of `message`, for the mappings read under it."""
        field = self._field(key)
        return field.message_type if field is not None else None

    def error(self, key: str, problem: str) -> None:
        self.errors.append(f"{self.prefix}{key}: {problem}" if key else f"{self.prefix.rstrip('.')}: {problem}")

    def _get(self, key: str, required: bool) -> Any:
        self._known.add(key)
        value = self.data.get(key)
        if value is None and required:
            self.error(key, "required field is missing")
        return value

    def ignore(self, key: str) -> None:
        """A key that may be present and means nothing here."""
        self._known.add(key)

    def finish(self) -> None:
        for key in self.data:
            if key not in self._known:
                close = difflib.get_close_matches(str(key), sorted(self._known - {"status"}), n=1, cutoff=0.6)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(self._known - {'status'}))})"
                self.errors.append(f"{self.prefix}{key}: unknown field{hint}")

    def string(self, key: str, required: bool = False) -> str | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.error(key, f"expected a non-empty string, got {describe(value)}")
            return None
        return value

    def integer(self, key: str, required: bool = False, minimum: int | None = None,
                maximum: int | None = None) -> int | None:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            self.error(key, f"expected an integer, got {describe(value)}")
            return None
        limits = self._field_range(key)
        if limits is not None:
            minimum = limits[0] if minimum is None else max(minimum, limits[0])
            maximum = limits[1] if maximum is None else min(maximum, limits[1])
        return self._bounded(key, value, minimum, maximum)

    def number(self, key: str, required: bool = False, minimum: float | None = None) -> float | None:
        value = self._get(key, required)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.error(key, f"expected a number, got {describe(value)}")
            return None
        try:
            as_float = float(value)
        except OverflowError:  # an integer beyond any double
            as_float = math.inf
        if not math.isfinite(as_float):  # .inf, .nan: no quantity (the controller refuses them too)
            self.error(key, f"expected a finite number, got {value}")
            return None
        return None if self._bounded(key, value, minimum, None) is None else as_float

    def _bounded(self, key: str, value: Any, minimum: Any, maximum: Any) -> Any:
        if minimum is not None and value < minimum:
            self.error(key, f"must be at least {minimum}, got {value}")
            return None
        if maximum is not None and value > maximum:
            self.error(key, f"must be at most {maximum}, got {value}")
            return None
        return value

    def boolean(self, key: str) -> bool | None:
        value = self._get(key, False)
        if value is None:
            return None
        if not isinstance(value, bool):
            self.error(key, f"expected true or false, got {describe(value)}")
            return None
        return value

    def strings(self, key: str) -> list[str]:
        value = self._get(key, False)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"expected a list of strings, got {describe(value)}")
            return []
        out: list[str] = []
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item:
                self.error(f"{key}[{i}]", f"expected a non-empty string, got {describe(item)}")
            else:
                out.append(item)
        return out

    def choice(self, key: str, choices: Mapping[str, int], required: bool = False) -> int | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, str) or value not in choices:
            self.error(key, f"expected one of {', '.join(choices)}, got {describe(value)}")
            return None
        return choices[value]

    def mapping(self, key: str, required: bool = False) -> Fields | None:
        value = self._get(key, required)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.error(key, f"expected a mapping, got {describe(value)}")
            return None
        return Fields(value, f"{self.prefix}{key}.", self.errors, self._nested(key))

    def mappings(self, key: str) -> list[Fields]:
        value = self._get(key, False)
        if value is None:
            return []
        if not isinstance(value, list):
            self.error(key, f"expected a list, got {describe(value)}")
            return []
        out: list[Fields] = []
        for i, item in enumerate(value):
            if not isinstance(item, Mapping):
                self.error(f"{key}[{i}]", f"expected a mapping, got {describe(item)}")
            else:
                out.append(Fields(item, f"{self.prefix}{key}[{i}].", self.errors, self._nested(key)))
        return out


def _parse_tenant(f: Fields) -> admin_pb2.Tenant:
    tenant = admin_pb2.Tenant(id=f.string("id", required=True) or "")
    isolation = f.choice("isolation", ISOLATION_BY_WORD)
    tenant.isolation = isolation if isolation is not None else common_pb2.ISOLATION_SHARED
    tenant.excludes.extend(f.strings("excludes"))
    tenant.zones.extend(f.strings("zones"))
    for key in ("reserved_accelerators", "max_accelerators", "max_power_w"):
        value = f.number(key, minimum=0)
        if value is not None:
            setattr(tenant, key, value)
    if tenant.id and tenant.id in tenant.excludes:
        f.error("excludes", f"a tenant cannot exclude itself ('{tenant.id}')")
    if (tenant.HasField("reserved_accelerators") and tenant.HasField("max_accelerators")
            and tenant.reserved_accelerators > tenant.max_accelerators):
        f.error("reserved_accelerators",
                f"{fmt(tenant.reserved_accelerators)} is more than max_accelerators "
                f"{fmt(tenant.max_accelerators)}")
    f.finish()
    return tenant


def _parse_topology(f: Fields) -> admin_pb2.Topology:
    topology = admin_pb2.Topology()
    for z in f.mappings("zones"):
        topology.zones.add(id=z.string("id", required=True) or "")
        z.finish()
    for r in f.mappings("rows"):
        row = topology.rows.add(id=r.string("id", required=True) or "",
                                zone=r.string("zone", required=True) or "")
        budget = r.number("power_budget_w", minimum=0)
        if budget is not None:
            row.power_budget_w = budget
        r.finish()
    for r in f.mappings("racks"):
        rack = topology.racks.add(id=r.string("id", required=True) or "",
                                  row=r.string("row", required=True) or "")
        budget = r.number("power_budget_w", minimum=0)
        if budget is not None:
            rack.power_budget_w = budget
        r.finish()
    if not (topology.zones or topology.rows or topology.racks):
        f.error("", "a Topology needs at least one of zones, rows, racks")
    f.finish()
    return topology


def _parse_shard(f: Fields) -> common_pb2.ShardSpec:
    shard = common_pb2.ShardSpec()
    accelerators = f.integer("accelerators", required=True, minimum=0)
    shard.accelerators = accelerators or 0
    milli = f.integer("accelerator_milli", minimum=1, maximum=1000)
    if milli is not None:
        shard.accelerator_milli = milli
        if milli < 1000 and accelerators is not None and accelerators != 1:
            f.error("accelerator_milli", f"a fraction ({milli}) needs accelerators: 1, got {accelerators}")
    for key in ("hbm_gib", "power_w"):
        value = f.number(key, minimum=0)
        if value is not None:
            setattr(shard, key, value)
    for key in ("cpu_milli", "memory_mib"):
        value = f.integer(key, minimum=0)
        if value is not None:
            setattr(shard, key, value)
    shard.accelerator_models.extend(f.strings("accelerator_models"))
    f.finish()
    return shard


def _parse_deployment(f: Fields) -> deployments_pb2.DeploymentSpec:
    spec = deployments_pb2.DeploymentSpec()
    name = f.string("name", required=True)
    if name is not None:
        if len(name) > NAME_MAX or not NAME_PATTERN.fullmatch(name):
            f.error("name", f"'{name}' is not a valid name (lowercase letters, digits and '-', "
                            f"starting and ending with a letter or digit, at most {NAME_MAX})")
        spec.name = name
    spec.tenant = f.string("tenant", required=True) or ""
    replicas = f.integer("replicas", required=True, minimum=1)
    spec.replicas = replicas or 0
    min_replicas = f.integer("min_replicas", minimum=1)
    if min_replicas is not None:
        if replicas is not None and min_replicas > replicas:
            f.error("min_replicas", f"{min_replicas} is more than replicas {replicas}")
        spec.min_replicas = min_replicas
    spec.shards_per_replica = f.integer("shards_per_replica", required=True, minimum=1) or 0
    shard = f.mapping("shard", required=True)
    if shard is not None:
        spec.shard.CopyFrom(_parse_shard(shard))
    locality = f.choice("locality", DOMAIN_BY_WORD)
    spec.locality = locality if locality is not None else common_pb2.DOMAIN_RACK
    spread = f.mapping("spread")
    if spread is not None:
        domain = spread.choice("domain", {k: v for k, v in DOMAIN_BY_WORD.items() if k != "none"},
                               required=True)
        spec.spread.domain = domain or common_pb2.DOMAIN_UNSPECIFIED
        spec.spread.max_per_domain = spread.integer("max_per_domain", required=True, minimum=1) or 0
        spread.finish()
    priority = f.integer("priority")
    spec.priority = priority or 0
    spec.preemptible = bool(f.boolean("preemptible"))
    f.finish()
    return spec


def fmt(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_PARSERS = {"Tenant": _parse_tenant, "Topology": _parse_topology, "Deployment": _parse_deployment}
# The API message each kind becomes (its fields are the manifest's keys).
_MESSAGES = {"Tenant": admin_pb2.Tenant.DESCRIPTOR, "Topology": admin_pb2.Topology.DESCRIPTOR,
             "Deployment": deployments_pb2.DeploymentSpec.DESCRIPTOR}
