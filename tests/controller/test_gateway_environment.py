"""What a gateway process takes of the controller's environment (`gateway_environment`): what
its interpreter and C library need to run as the controller's do, none of the controller's
settings or the host's credentials."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.gateway.children import gateway_environment


def test_the_gateways_interpreter_finds_the_controllers_user_site_packages(tmp_path: Path) -> None:
    """A controller installed with `pip install --user` under its $HOME (one that is not the
    password database's home, or a uid with no entry there: a container's): the gateway's
    interpreter must look for its packages where the controller's does."""
    environ = {name: value for name, value in os.environ.items() if name != "PYTHONUSERBASE"}
    environ["HOME"] = str(tmp_path)
    user_site = subprocess.run([sys.executable, "-c", "import site; print(site.getusersitepackages())"],
                               env=gateway_environment(environ), capture_output=True, text=True, check=True)
    assert user_site.stdout.strip().startswith(str(tmp_path))


def test_the_c_librarys_allocator_settings_reach_the_gateway_and_secrets_do_not() -> None:
    environ = {"MALLOC_ARENA_MAX": "2", "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072",
               "LD_PRELOAD": "/usr/lib/libjemalloc.so.2", "MAIA_DB_URL": "postgresql://maia:pw@db/maia",
               "MAIA_TOKEN": "secret", "AWS_SECRET_ACCESS_KEY": "secret"}
    assert gateway_environment(environ) == {"MALLOC_ARENA_MAX": "2",
                                            "GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072",
                                            "LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}
