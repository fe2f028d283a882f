"""`maia-controller --agent-gateways`: the real binary's gateway processes live and die with it."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from controller.gateway import linkdir

BIN = Path(sys.executable).parent / "maia-controller"


def gateway_pids(controller_pid: int) -> list[int]:
    """The controller's children running `controller.gateway`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, IndexError):
            continue
        if ppid == controller_pid and "controller.gateway" in cmdline:
            pids.append(int(entry.name))
    return pids


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := [p for p in pids if alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def link_directories(temporary: Path) -> list[Path]:
    """The gateway link directories (`maia-gateways-*`) of the controllers `start` started."""
    return sorted(temporary.glob(f"{linkdir.PREFIX}*"))


def start(tmp_path: Path, temporary: Path, gateways: int, **environment: str) -> tuple[subprocess.Popen[str], str]:
    """`maia-controller` with `gateways` gateways; its temporary directory (where the links'
    directory is made, and left when it is killed) is `temporary` (short: the link's socket
    path must fit a unix socket's 107 bytes), not the machine's /tmp."""
    proc = subprocess.Popen([str(BIN), "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
                             "--insecure-no-auth", "--no-decide-process", "--agent-gateways", str(gateways),
                             "--agent-listen", "127.0.0.1:0"], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "TMPDIR": str(temporary), **environment})
    assert proc.stdout is not None
    assert proc.stdout.readline().startswith("maia-controller listening on ")
    agents = proc.stdout.readline()
    assert agents.startswith("maia-controller agents on ") and agents.strip().endswith(f"({gateways} gateways)")
    return proc, agents.split()[3]


def test_a_stopped_controller_stops_its_gateways(tmp_path: Path, socket_tmp: Path) -> None:
    controller, address = start(tmp_path, socket_tmp, 2)
    try:
        pids = gateway_pids(controller.pid)
        assert len(pids) == 2 and address.startswith("127.0.0.1:") and not address.endswith(":0")
        controller.send_signal(signal.SIGTERM)
        assert controller.wait(30) == 0
        assert wait_gone(pids, 10) == []
    finally:
        controller.kill()
        controller.wait(10)


def test_the_gateways_of_a_killed_controller_exit_on_their_own(tmp_path: Path, socket_tmp: Path) -> None:
    controller, _ = start(tmp_path, socket_tmp, 1)
    pids = gateway_pids(controller.pid)
    try:
        assert len(pids) == 1
        controller.kill()  # kill -9: nothing stops the gateways but their lost link
        controller.wait(10)
        assert wait_gone(pids, 20) == []
    finally:
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_gateway_gets_none_of_the_controllers_secrets_from_its_environment(tmp_path: Path, socket_tmp: Path) -> None:
    controller, _ = start(tmp_path, socket_tmp, 1, MAIA_DB_URL="postgresql+asyncpg://maia:hunter2@db/maia",
                          MAIA_TOKEN="maia_secret.token", AWS_SECRET_ACCESS_KEY="hunter3")
    try:
        [pid] = gateway_pids(controller.pid)
        environment = dict(entry.split("=", 1) for entry in
                           Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0") if entry)
        assert not [name for name in environment if name.startswith(("MAIA_", "AWS_"))]
        assert "hunter2" not in str(environment)
        assert environment["TMPDIR"] == str(socket_tmp) and environment["PYTHONUNBUFFERED"] == "1"
    finally:
        controller.terminate()
        controller.wait(30)


def test_the_next_controller_removes_the_link_directory_a_killed_one_left(tmp_path: Path, socket_tmp: Path) -> None:
    killed, _ = start(tmp_path, socket_tmp, 1)
    try:
        [left] = link_directories(socket_tmp)
        assert (left / linkdir.OWNER_FILE).read_text().strip() == str(killed.pid)
    finally:
        killed.kill()  # kill -9: it cannot remove its directory
        killed.wait(10)
    assert link_directories(socket_tmp) == [left] and (left / linkdir.SOCKET_FILE).exists()
    nxt, _ = start(tmp_path, socket_tmp, 1)
    try:
        [made] = link_directories(socket_tmp)
        assert made != left and (made / linkdir.OWNER_FILE).read_text().strip() == str(nxt.pid)
        nxt.send_signal(signal.SIGTERM)
        assert nxt.wait(30) == 0
        assert link_directories(socket_tmp) == []  # a clean stop removes its own
    finally:
        nxt.kill()
        nxt.wait(10)


def test_a_gateway_whose_controller_died_before_it_linked_exits_on_its_own(tmp_path: Path) -> None:
    """A gateway started (again) just before its controller was SIGKILLed finds the link's socket
    file left behind and no one serving it: it exits rather than wait forever, an orphan."""
    link = tmp_path / "relay.sock"
    with socket.socket(socket.AF_UNIX) as left_behind:
        left_behind.bind(str(link))  # the file stays; connecting to it is refused
    gateway = subprocess.Popen([sys.executable, "-m", "controller.gateway", "--listen", "127.0.0.1:0",
                                "--link", f"unix:{link}", "--link-ready-timeout", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert gateway.wait(60) == 4  # EXIT_LINK_LOST
        assert gateway.stdout is not None and gateway.stdout.read() == ""  # it never served agents
    finally:
        gateway.kill()
        gateway.wait(10)


@pytest.mark.parametrize("argv, message", [
    (["--agent-gateways", "1", "--agent-listen", "127.0.0.1:99999"], "--agent-listen"),
])
def test_a_bad_agent_listen_address_exits_2(tmp_path: Path, argv: list[str], message: str) -> None:
    proc = subprocess.run([str(BIN), "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
                           *argv], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "m.db").exists()


def test_the_gateway_process_loads_neither_the_database_nor_the_solver() -> None:
    """A gateway relays bytes: importing the controller's store or scheduler cost it ~110 MiB."""
    loaded = subprocess.run([sys.executable, "-c", "import sys, controller.gateway.process; "
                             "print(sorted({m.split('.')[0] for m in sys.modules}))"],
                            capture_output=True, text=True, timeout=60, check=True).stdout
    for heavy in ("sqlalchemy", "ortools", "aiosqlite", "scheduler"):
        assert f"'{heavy}'" not in loaded


def test_a_temporary_directory_too_long_for_the_links_socket_stops_the_start_with_one_clear_line(
        tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 100)
    deep.mkdir()
    proc = subprocess.run([str(BIN), "--listen", "127.0.0.1:0", "--db", f"sqlite+aiosqlite:///{tmp_path / 'm.db'}",
                           "--insecure-no-auth", "--no-decide-process", "--agent-gateways", "1",
                           "--agent-listen", "127.0.0.1:0"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=60, env={**os.environ, "TMPDIR": str(deep)})
    assert proc.returncode != 0 and "listening on" not in proc.stdout
    assert "maia-controller: the agent gateways' link socket" in proc.stderr
    assert "set TMPDIR to a shorter directory" in proc.stderr and "Traceback" not in proc.stderr


# A controller's end of the link in a process of its own (the relay, no agent method), pinging
# (HTTP/2's pings and the relay's own) and permitting pings as `KEEPALIVE` says; argv: the link's
# address, then `KEEPALIVE`.
RELAY_SERVER = """
import asyncio, sys
from grpc import aio
from controller.gateway.frames import keepalive_from_text, link_ping_times, link_server_options
from controller.gateway.relay import RelayServicer
from maia.v1 import relay_pb2_grpc

async def main():
    keepalive = keepalive_from_text(sys.argv[2])
    server = aio.server(options=link_server_options(keepalive))
    relay_pb2_grpc.add_AgentRelayServicer_to_server(RelayServicer(0.005, link_ping_times(keepalive)), server)
    server.add_insecure_port(sys.argv[1])
    await server.start()
    print("serving", flush=True)
    await server.wait_for_termination()

asyncio.run(main())
"""
KEEPALIVE = "500,500,500,500,250"  # pings every 0.5 s, unanswered after 0.5 s


def _gateway_exits_once_its_controller_stops_answering(link: str, controller_script: str, stop: signal.Signals,
                                                       pinged_s: float) -> None:
    """A relay server running `controller_script` and a real gateway linked to it; after `pinged_s`
    of pings the gateway is still linked; then the server gets `stop`, and the gateway exits
    EXIT_LINK_LOST (4) while the server is still there."""
    controller = subprocess.Popen([sys.executable, "-c", controller_script, link, KEEPALIVE], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)
    gateway: subprocess.Popen[str] | None = None
    try:
        assert controller.stdout is not None and controller.stdout.readline().strip() == "serving"
        gateway = subprocess.Popen([sys.executable, "-m", "controller.gateway", "--listen", "127.0.0.1:0",
                                    "--link", link, "--keepalive", KEEPALIVE], stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        assert gateway.stdout is not None and gateway.stdout.readline().startswith("maia-gateway listening on ")
        time.sleep(pinged_s)  # pinged each way, answered: the link stays
        assert gateway.poll() is None
        controller.send_signal(stop)
        assert gateway.wait(20) == 4  # EXIT_LINK_LOST
        assert controller.poll() is None  # still there: the gateway gave the link up
    finally:
        controller.kill()
        controller.wait(10)
        if gateway is not None:
            gateway.kill()
            gateway.wait(10)


def test_a_gateway_whose_controller_hangs_exits_on_its_own(tmp_path: Path) -> None:
    """The controller stopped (SIGSTOP: alive, its socket open, answering nothing): its gateway's
    link pings go unanswered, and the gateway exits as for a controller gone (its agents' calls end
    UNAVAILABLE: they go on to the next controller) instead of holding them on a dead link."""
    _gateway_exits_once_its_controller_stops_answering(f"unix:{tmp_path / 'relay.sock'}", RELAY_SERVER,
                                                        signal.SIGSTOP, pinged_s=2.0)


def test_a_gateway_whose_controllers_event_loop_is_stuck_exits_on_its_own(tmp_path: Path) -> None:
    """The controller's event loop stuck (a blocking call: SIGUSR1 makes this one sleep in its main
    thread) while its gRPC core still answers the link's keepalive pings: the relay's own pings
    (`RelayEvent.ping`) stop, and the gateway exits as for a controller gone (its agents go on to
    the next controller) instead of holding them on a link nothing reads."""
    stuck_on_sigusr1 = "import signal, time\nsignal.signal(signal.SIGUSR1, lambda *_: time.sleep(600))\n"
    # Past the link pings' timeout (5 s, `frames.LINK_PING_TIMEOUT_MIN_S`), pinged: it stays.
    _gateway_exits_once_its_controller_stops_answering(f"unix:{tmp_path / 'relay.sock'}",
                                                        stuck_on_sigusr1 + RELAY_SERVER, signal.SIGUSR1, pinged_s=6.0)
