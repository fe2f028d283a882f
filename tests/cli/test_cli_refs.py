"""How by-name commands read a deployment: NAME (with -n/--tenant) or TENANT/NAME."""
from __future__ import annotations

import pytest

from controller.cli.client import CliError, Exit
from controller.cli.refs import DeploymentRef, deployment_ref


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
