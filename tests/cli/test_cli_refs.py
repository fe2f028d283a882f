"""How by-name commands read a deployment: NAME (with -n/--tenant) or TENANT/NAME."""
from __future__ import annotations

import pytest

from controller.cli.client import CliError, Exit
from controller.cli.refs import DeploymentRef, deployment_name, deployment_ref


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
