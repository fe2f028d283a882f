"""How by-name commands read a deployment: NAME (with -n/--tenant) or TENANT/NAME."""
from __future__ import annotations

import pytest

from controller.cli.client import CliError, Exit
from controller.cli.refs import (
    DEPLOYMENT_WORDS, NODE_WORDS, DeploymentRef, deployment_name, deployment_ref, kind_and_name, kind_and_names,
    placement_name,
)


@pytest.mark.parametrize(("word", "tenant", "expected"), [
    ("chat", None, DeploymentRef("", "chat")),
    ("chat", "lab-a", DeploymentRef("lab-a", "chat")),
    ("lab-a/chat", None, DeploymentRef("lab-a", "chat")),
    ("lab-a/chat", "lab-a", DeploymentRef("lab-a", "chat")),
])
def test_a_name_with_or_without_its_tenant(word: str, tenant: str | None, expected: DeploymentRef) -> None:
    assert deployment_ref(word, tenant) == expected
    assert str(expected) == (f"{expected.tenant}/{expected.name}" if expected.tenant else expected.name)


@pytest.mark.parametrize(("word", "tenant", "says"), [
    ("lab-b/chat", "lab-a", "--tenant says lab-a"),
    ("/chat", None, "expected NAME or TENANT/NAME"),
    ("lab-a/", None, "expected NAME or TENANT/NAME"),
])
def test_contradictions_and_halves_are_usage_errors(word: str, tenant: str | None, says: str) -> None:
    with pytest.raises(CliError) as caught:
        deployment_ref(word, tenant)
    assert caught.value.exit_code == Exit.USAGE and says in str(caught.value)


@pytest.mark.parametrize(("word", "tenant", "expected"), [
    # What `-o name` prints, read back (`deployment/lab-a/chat` was tenant 'deployment/lab-a').
    ("deployment/lab-a/chat", None, DeploymentRef("lab-a", "chat")),
    ("deployment/chat", None, DeploymentRef("", "chat")),  # was tenant 'deployment'
    ("deploy/chat", "lab-a", DeploymentRef("lab-a", "chat")),
    ("deployments/deployment/chat", None, DeploymentRef("deployment", "chat")),  # a tenant named so
])
def test_a_name_after_its_kind_as_o_name_prints_it(word: str, tenant: str | None, expected: DeploymentRef) -> None:
    assert deployment_ref(word, tenant) == expected
    assert deployment_name(expected.tenant, expected.name) == f"deployment/{expected}"


@pytest.mark.parametrize("word", ["deployment/", "deployment/a/b/c", "a/b/c", "deployment//chat"])
def test_a_kind_without_a_name_or_too_many_parts_is_a_usage_error(word: str) -> None:
    with pytest.raises(CliError) as caught:
        deployment_ref(word, None)
    assert caught.value.exit_code == Exit.USAGE


KINDS = {**DEPLOYMENT_WORDS, **NODE_WORDS}


@pytest.mark.parametrize(("words", "default", "expected"), [
    (["deployment", "chat", "lab/chat"], "", ("deployment", ["chat", "lab/chat"])),
    # The first NAME as `-o name` prints it stands for KIND too; deployments keep their word whole.
    (["deployment/lab/chat", "deploy/web"], "", ("deployment", ["deployment/lab/chat", "deploy/web"])),
    (["deployment", "deployment/lab/chat"], "", ("deployment", ["deployment/lab/chat"])),
    (["node/n1", "n2", "nodes/n3"], "", ("node", ["n1", "n2", "n3"])),
    (["nodes"], "", ("node", [])),
    # With a default kind, KIND may be left out.
    (["n1", "node/n2"], "node", ("node", ["n1", "n2"])),
    (["lab/chat"], "deployment", ("deployment", ["lab/chat"])),
])
def test_kind_and_names_reads_kind_name_and_kind_slash_name(words: list[str], default: str,
                                                            expected: tuple[str, list[str]]) -> None:
    assert kind_and_names("cmd", words, KINDS, default) == expected


@pytest.mark.parametrize(("words", "default", "says"), [
    (["pods", "x"], "", "cmd: unknown kind 'pods' (one of deployment, node, or KIND/NAME)"),
    ([], "", "cmd: unknown kind ''"),
    (["deployment/lab/chat", "node/n1"], "", "cmd deployment: 'node/n1' names a node (one kind per cmd)"),
    (["n1", "deployment/x"], "node", "cmd node: 'deployment/x' names a deployment"),
    (["node/"], "", "'node/': expected node/NAME"),
])
def test_kind_and_names_refuses_an_unknown_kind_or_two_kinds(words: list[str], default: str, says: str) -> None:
    with pytest.raises(CliError) as caught:
        kind_and_names("cmd", words, KINDS, default)
    assert caught.value.exit_code == Exit.USAGE and str(caught.value).startswith(says), str(caught.value)


def test_kind_and_name_wants_exactly_one_object() -> None:
    assert kind_and_name("cmd", ["deployment/lab/chat"], DEPLOYMENT_WORDS) == ("deployment", "deployment/lab/chat")
    assert kind_and_name("cmd", ["deploy", "chat"], DEPLOYMENT_WORDS) == ("deployment", "chat")
    assert kind_and_name("cmd", ["chat"], DEPLOYMENT_WORDS, default="deployment") == ("deployment", "chat")
    for words in (["deployment"], ["deployment/a", "b"], ["deployment", "a", "b"]):
        with pytest.raises(CliError) as caught:
            kind_and_name("cmd", words, DEPLOYMENT_WORDS)
        assert caught.value.exit_code == Exit.USAGE and "one object" in str(caught.value)


def test_a_placement_is_named_with_its_deployments_tenant() -> None:
    assert placement_name("lab-a", "chat", 1, 3) == "placement/lab-a/chat/1/3"
    assert placement_name("", "chat", 0, 0) == "placement/chat/0/0"  # the tenant not known
