"""`maia-simnode`'s entry point (controller/simnode/main.py): a fleet stopped by a signal exits 0,
also when a second SIGTERM comes after its loop closed (`bench e2e` tells every fleet, then each in
turn again, while it waits for them)."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from controller import limits
from controller.simnode.fleet import Fleet, FleetShape
from controller.simnode.main import build_parser, parse_args

# The fleet's main() returned after its stop, then signalled again: the loop has closed and given
# its handlers back by then.
_SIGNALLED_AFTER_MAIN = """
import os, signal, sys, time
from controller.simnode import main
code = main.main(sys.argv[1:])
os.kill(os.getpid(), signal.SIGTERM)
time.sleep(0.2)
sys.exit(code)
"""


def test_a_sigterm_after_the_fleet_stopped_does_not_kill_it(tmp_path: Path) -> None:
    # No controller there: the node tries to register until it is stopped.
    proc = subprocess.Popen(
        [sys.executable, "-c", _SIGNALLED_AFTER_MAIN, "--controller", "127.0.0.1:1", "--racks", "1",
         "--nodes-per-rack", "1", "--state-dir", str(tmp_path / "state")],
        stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            if "starting 1 simulated nodes" in line:
                break
        else:
            raise AssertionError(f"the fleet exited ({proc.wait()}) before it started")
        proc.send_signal(signal.SIGTERM)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 0, rest  # not -15 (SIGTERM's default action)
        assert "all 1 nodes stopped" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_state_dir_that_cannot_be_written_is_refused_at_once(tmp_path: Path) -> None:
    """The nodes found it out at their first credential, each ending with FileNotFoundError, and
    the fleet exited 0 (a container whose user has no home: compose restarted it forever)."""
    (tmp_path / "a-file").write_text("")
    done = subprocess.run([sys.executable, "-m", "controller.simnode.main", "--controller", "127.0.0.1:1",
                           "--racks", "1", "--nodes-per-rack", "1", "--state-dir", str(tmp_path / "a-file" / "state")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "--state-dir" in done.stderr and "give a writable --state-dir" in done.stderr
    assert "starting" not in done.stderr


async def test_a_fleet_whose_nodes_ended_with_errors_says_how_many() -> None:
    class Failing:
        def __init__(self, node_id: str, error: BaseException | None) -> None:
            self.spec = SimpleNamespace(node_id=node_id)
            self._error = error

        async def run(self) -> None:
            if self._error is not None:
                raise self._error

    fleet = Fleet([Failing("n0", FileNotFoundError("credentials")), Failing("n1", None),  # type: ignore[list-item]
                   Failing("n2", asyncio.CancelledError())], stagger_s=0)
    assert await fleet.run() == 1  # a node stopped (or cancelled) is no error


def test_a_fleet_given_another_controller_list_keeps_its_nodes_credentials(tmp_path: Path) -> None:
    """Restarted with a second controller for HA (`--controller A,B`, the same --state-dir), the
    fleet looked for a file of that name, found none, and every node was refused: the bootstrap
    token registers new nodes only (found by exploratory testing)."""
    from controller.simnode.credentials import CredentialFile

    CredentialFile.for_fleet(tmp_path, "10.0.0.1:50051", "rack").put("rack-00-n00", "cred-a")
    CredentialFile.for_fleet(tmp_path, "10.0.0.9:50051", "other").put("other-00-n00", "cred-o")
    grown = CredentialFile.for_fleet(tmp_path, "10.0.0.1:50051,10.0.0.2:50051", "rack")
    assert grown.get("rack-00-n00") == "cred-a" and grown.path.exists()
    shrunk = CredentialFile.for_fleet(tmp_path, "10.0.0.2:50051", "rack")  # shares an address with `grown`
    assert shrunk.get("rack-00-n00") == "cred-a"
    for unrelated in (("10.0.0.1:5005", "rack"), ("10.0.0.9:50051", "rack"), ("10.0.0.1:50051", "rack-0")):
        assert CredentialFile.for_fleet(tmp_path, *unrelated).get("rack-00-n00") is None, unrelated


async def test_a_stop_during_the_staggered_start_starts_no_more_nodes() -> None:
    """The stagger's pauses end with the stop, and the nodes not started yet never start (the
    fleet slept out each one's stagger: 100 s for 10,000 nodes at the default 0.01 s)."""
    started: list[str] = []

    class Waiting:
        def __init__(self, node_id: str) -> None:
            self.spec = SimpleNamespace(node_id=node_id)
            self._stopped = asyncio.Event()

        async def run(self) -> None:
            started.append(self.spec.node_id)
            await self._stopped.wait()

        def stop(self) -> None:
            self._stopped.set()

    fleet = Fleet([Waiting(f"n{i}") for i in range(100)], stagger_s=60.0)  # type: ignore[misc]
    run = asyncio.create_task(fleet.run())
    while not started:
        await asyncio.sleep(0.01)
    fleet.stop()
    assert await asyncio.wait_for(run, timeout=5) == 0
    assert started == ["n0"]


def test_durations_and_amounts_that_are_not_finite_numbers_are_usage_errors(tmp_path: Path) -> None:
    """inf, nan and 1e400 are refused (exit 2, the flag named): an infinite or NaN heartbeat
    interval ended every node with a traceback (it cannot be sent as milliseconds), and NaN
    passed the other flags' `< 0` checks."""
    base = ["--controller", "127.0.0.1:1", "--racks", "1", "--nodes-per-rack", "1",
            "--state-dir", str(tmp_path / "state")]
    for flag, value in [("--heartbeat-interval", "inf"), ("--heartbeat-interval", "nan"),
                        ("--heartbeat-interval", "1e7"), ("--stagger", "nan"), ("--load-delay", "-1"),
                        ("--register-timeout", "0"), ("--register-timeout", "1e400"), ("--idle-power-w", "nan"),
                        ("--hbm-gib", "-inf")]:
        done = subprocess.run([sys.executable, "-m", "controller.simnode.main", *base, flag, value],
                              capture_output=True, text=True, timeout=60)
        assert done.returncode == 2, (flag, value, done.stderr)
        assert f"argument {flag}:" in done.stderr and "Traceback" not in done.stderr, done.stderr


@pytest.mark.parametrize("flag, value, said", [
    ("--accelerators", "0", "must be at least 1, got 0"),
    ("--accelerators", "-4", "must be at least 1, got -4"),
    ("--accelerators", "65", f"must be at most {limits.NODE_ACCELERATORS_MAX}, got 65"),
    ("--accelerators", "2.5", "expected a whole number, got '2.5'"),
    ("--hbm-gib", "-8", "must be at least 0, got -8"),
    ("--hbm-gib", "1e9", "must be at most 65536, got 1e9"),
    ("--idle-power-w", "-1", "must be at least 0, got -1"),
    ("--idle-power-w", "2e7", "must be at most 10000000, got 2e7"),
    ("--racks", "4097", f"must be at most {limits.TOPOLOGY_ITEMS_MAX}, got 4097"),
    ("--nodes-per-rack", "0", "must be at least 1, got 0"),
    ("--model", "m" * 65, f"must be at most {limits.MODEL_MAX} characters, got 65"),
    ("--model", "maia\n100", "must hold no control character"),
])
def test_a_node_shape_the_controller_would_not_register_is_a_usage_error(
        flag: str, value: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Negative or huge accelerators, HBM or power (and 0 accelerators) were taken, and every node's
    Register was then refused INVALID_ARGUMENT (controller/usecases/agents.py bounds NodeInfo by
    controller/limits.py). 0 GiB of HBM is taken, as Register takes it: the HBM not said."""
    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["--racks", "1", "--nodes-per-rack", "1", flag, value])
    assert exited.value.code == 2
    assert f"argument {flag}: {said}" in capsys.readouterr().err


def test_a_node_shape_at_the_controllers_limits_is_taken() -> None:
    args = build_parser().parse_args([
        "--racks", str(limits.TOPOLOGY_ITEMS_MAX), "--nodes-per-rack", "1",
        "--accelerators", str(limits.NODE_ACCELERATORS_MAX), "--hbm-gib", f"{limits.HBM_GIB_MAX:g}",
        "--idle-power-w", "0", "--model", "m" * limits.MODEL_MAX])
    assert (args.racks, args.accelerators, args.hbm_gib, args.idle_power_w) == (
        limits.TOPOLOGY_ITEMS_MAX, limits.NODE_ACCELERATORS_MAX, limits.HBM_GIB_MAX, 0.0)
    unsaid = build_parser().parse_args(["--racks", "1", "--nodes-per-rack", "1", "--hbm-gib", "0"])
    assert unsaid.hbm_gib == 0.0  # Register reads 0 as the HBM not said


_LONGEST_PREFIX_1X1 = limits.ID_MAX - len("00-n00")  # rack <prefix>00, its node <prefix>00-n00


@pytest.mark.parametrize("argv, said", [
    (["--racks", "4096", "--nodes-per-rack", "17"], "--racks 4096 x --nodes-per-rack 17 is 69,632 nodes; one fleet "
                                                     f"runs at most {limits.SIMNODE_FLEET_NODES_MAX:,}"),
    (["--racks", "1", "--nodes-per-rack", str(limits.SIMNODE_FLEET_NODES_MAX + 1)], "is 65,537 nodes"),
    (["--racks", "2", "--nodes-per-rack", "2", "--rack-prefix", "r/"],
     "--rack-prefix 'r/' makes ids the controller refuses (such as 'r/01-n01')"),
    (["--racks", "2", "--nodes-per-rack", "2", "--rack-prefix=-r"],
     "--rack-prefix '-r' makes ids the controller refuses"),
    (["--racks", "1", "--nodes-per-rack", "1", "--rack-prefix", "rack\n"], "makes ids the controller refuses"),
    (["--racks", "1", "--nodes-per-rack", "1", "--rack-prefix", "räck-"], "makes ids the controller refuses"),
    (["--racks", "1", "--nodes-per-rack", "1", "--rack-prefix", "r" * (_LONGEST_PREFIX_1X1 + 1)],
     f"--rack-prefix of {_LONGEST_PREFIX_1X1 + 1} characters makes node ids of {limits.ID_MAX + 1}"),
    # The longest name the fleet makes is judged: the prefix that fits 1 x 1 does not fit 101 racks
    # (their index in three digits) nor 100 nodes a rack.
    (["--racks", "101", "--nodes-per-rack", "1", "--rack-prefix", "r" * _LONGEST_PREFIX_1X1],
     f"makes node ids of {limits.ID_MAX + 1}"),
    (["--racks", "1", "--nodes-per-rack", "101", "--rack-prefix", "r" * _LONGEST_PREFIX_1X1],
     f"makes node ids of {limits.ID_MAX + 1}"),
])
def test_a_fleet_the_controller_would_not_register_is_a_usage_error(
        argv: list[str], said: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Any --rack-prefix and any --racks x --nodes-per-rack were taken: rack and node ids the
    controller refuses (a '/', a leading '-', over 128 characters) had every Register refused
    INVALID_ARGUMENT, and a fleet of millions of nodes was built before anything said so."""
    with pytest.raises(SystemExit) as exited:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert err.rstrip("\n").splitlines()[-1].startswith("maia-simnode: error: ") and said in err, err


def test_a_fleet_at_the_limits_is_taken_and_makes_ids_the_controller_takes() -> None:
    whole = parse_args(["--racks", str(limits.TOPOLOGY_ITEMS_MAX), "--nodes-per-rack",
                        str(limits.SIMNODE_FLEET_NODES_MAX // limits.TOPOLOGY_ITEMS_MAX)])
    assert whole.racks * whole.nodes_per_rack == limits.SIMNODE_FLEET_NODES_MAX
    prefix = "r" * (limits.ID_MAX - len("100-n99"))  # 101 racks (3 digits) of 100 nodes (2 digits)
    args = parse_args(["--racks", "101", "--nodes-per-rack", "100", "--rack-prefix", prefix])
    specs = FleetShape(racks=args.racks, nodes_per_rack=args.nodes_per_rack, rack_prefix=args.rack_prefix).node_specs()
    for name in {spec.rack for spec in specs} | {spec.node_id for spec in specs}:
        assert re.fullmatch(limits.ID_PATTERN, name) and len(name) <= limits.ID_MAX, name
    assert max(len(spec.node_id) for spec in specs) == limits.ID_MAX
    assert parse_args(["--racks", "2", "--nodes-per-rack", "2", "--rack-prefix", ""]).rack_prefix == ""  # ids 00-n00
