"""Fuzz every RPC of every maia.v1 service against a real controller (SQLite and PostgreSQL).

Hypothesis builds request messages from their descriptors (see fuzz_strategies) and also sends
raw bytes; for every call it asserts a proper status within a time bound (never UNKNOWN,
INTERNAL, DATA_LOSS or UNIMPLEMENTED; a unary call never runs into its deadline), and after each
one that the controller is still SERVING and what it committed is consistent: the snapshot is a
valid placement problem, every stored deployment and node is within today's limits, and no
accelerator holds more than 1000 milli-units. The budget is fixed and derandomized so CI is
repeatable: FUZZ_EXAMPLES structured and RAW_EXAMPLES raw calls per database backend.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor
from google.protobuf.message_factory import GetMessageClass
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import maia.v1
from controller.api.server import SERVICE_NAMES, ControllerApp
from controller.store import models as m
from controller.store import repositories as repo
from controller.usecases import agents as agent_cases
from controller.usecases import planning
from controller.usecases.deployments import validate_spec
from fuzz_strategies import messages
from grpc_harness import Stubs
from scheduler import problem_from_dict

FUZZ_EXAMPLES = 100
RAW_EXAMPLES = 40
UNARY_TIMEOUT_S = 10.0
STREAM_TIMEOUT_S = 0.3
NEVER = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL, grpc.StatusCode.DATA_LOSS,
         grpc.StatusCode.UNIMPLEMENTED}
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None,
                         suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                                HealthCheck.data_too_large])


def _services() -> Iterator[ServiceDescriptor]:
    """Every service declared in proto/ (maia.v1)."""
    for info in pkgutil.iter_modules(maia.v1.__path__):
        if info.name.endswith("_pb2"):
            yield from importlib.import_module(f"maia.v1.{info.name}").DESCRIPTOR.services_by_name.values()


def _methods() -> list[MethodDescriptor]:
    """Every method of every service the controller's port serves (`SERVICE_NAMES`; the gateways'
    private link, AgentRelay, is served only on a unix socket of the controller's own)."""
    found = [md for service in _services() if service.full_name in SERVICE_NAMES for md in service.methods]
    return sorted(found, key=lambda md: md.full_name)


METHODS = _methods()
CASES: dict[str, int] = defaultdict(int)
# Services in proto/ that the controller's port does not serve, and why.
PRIVATE_SERVICES = {"maia.v1.AgentRelay"}  # the gateways' link, on a unix socket only (controller/gateway/)


def test_the_fuzzed_services_are_every_service_but_the_private_link() -> None:
    """A service added to proto/ is either served on the port (and so fuzzed) or named private."""
    declared = {service.full_name for service in _services()}
    assert declared - PRIVATE_SERVICES == set(SERVICE_NAMES)
    assert {md.containing_service.full_name for md in METHODS} == set(SERVICE_NAMES)


@pytest.fixture(scope="module", autouse=True)
def _report_cases() -> Iterator[None]:
    yield
    print(f"\nfuzz cases run: {dict(CASES)} total {sum(CASES.values())}")


def _path(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


# A client stream whose server ended the call while the client was still writing fails on the
# client's side with this INTERNAL (the server's own status is in its log, checked separately).
CLIENT_WRITE_FAILED = "Internal error from Core"


async def _call(channel: grpc.aio.Channel, method: MethodDescriptor, request: Any) -> grpc.StatusCode:
    """Call once; the status it ended with (streams: read a few messages, then stop waiting)."""
    def serialize(msg: Any) -> bytes:  # raw bytes (also inside a client stream) go out as they are
        return msg if isinstance(msg, bytes) else msg.SerializeToString()

    reply_type = GetMessageClass(method.output_type)
    try:
        if method.client_streaming:
            call = channel.stream_stream(_path(method), request_serializer=serialize,
                                         response_deserializer=reply_type.FromString)(
                iter(request if isinstance(request, list) else [request]), timeout=STREAM_TIMEOUT_S)
            async for _ in call:
                pass
        elif method.server_streaming:
            call = channel.unary_stream(_path(method), request_serializer=serialize,
                                        response_deserializer=reply_type.FromString)(request, timeout=STREAM_TIMEOUT_S)
            async for _ in call:
                pass
        else:
            await channel.unary_unary(_path(method), request_serializer=serialize,
                                      response_deserializer=reply_type.FromString)(request, timeout=UNARY_TIMEOUT_S)
    except grpc.aio.AioRpcError as exc:
        if method.client_streaming and exc.code() == grpc.StatusCode.INTERNAL and exc.details() == CLIENT_WRITE_FAILED:
            return grpc.StatusCode.ABORTED  # the server ended it first; what it said is in its log
        return exc.code()
    return grpc.StatusCode.OK


def _allowed(method: MethodDescriptor, code: grpc.StatusCode) -> bool:
    if code in NEVER:
        return False
    streams = method.client_streaming or method.server_streaming
    return streams or code != grpc.StatusCode.DEADLINE_EXCEEDED


def _no_internal_errors(caplog: pytest.LogCaptureFixture) -> None:
    """The server side: no call ended in the error interceptor's INTERNAL path."""
    unexpected = [r.getMessage() for r in caplog.records if r.getMessage().startswith("unexpected error in")]
    assert not unexpected, unexpected


async def _still_healthy_and_consistent(app: ControllerApp, stubs: Stubs) -> None:
    health = await health_pb2_grpc.HealthStub(stubs.channel).Check(health_pb2.HealthCheckRequest(service=""))
    assert health.status == health_pb2.HealthCheckResponse.SERVING, app.monitor.problems
    async with app.db.unit_of_work() as uow:
        snapshot = await planning.load_snapshot(uow.session)
        problem_from_dict(snapshot.problem)  # a valid placement problem: schema and references
        for row in await repo.list_deployment_rows(uow.session):
            if row.phase is not m.DeploymentPhase.QUARANTINED:
                validate_spec(repo.deployment_spec(row))
        for node in await repo.list_node_rows(uow.session):
            agent_cases._validate(repo.node_info(node))
    milli: dict[tuple[str, int], int] = defaultdict(int)
    for p in snapshot.problem["placements"]:
        for index in p["accelerator_indices"]:
            milli[(p["node"], index)] += p.get("accelerator_milli") or 1000
    assert all(v <= 1000 for v in milli.values()), {k: v for k, v in milli.items() if v > 1000}


def _request(method: MethodDescriptor) -> st.SearchStrategy[Any]:
    one = messages(method.input_type)
    return st.lists(one, min_size=1, max_size=4) if method.client_streaming else one


@settings(max_examples=FUZZ_EXAMPLES, **FUZZ_SETTINGS)
@given(data=st.data())
async def test_fuzzed_requests_get_a_proper_status_and_leave_the_controller_sound(seeded: Stubs, controller_app,
                                                                                 caplog, data: st.DataObject):
    method = data.draw(st.sampled_from(METHODS), label="method")
    request = data.draw(_request(method), label="request")
    code = await _call(seeded.channel, method, request)
    CASES["structured"] += 1
    assert _allowed(method, code), f"{method.full_name} answered {code.name}"
    _no_internal_errors(caplog)
    await _still_healthy_and_consistent(controller_app, seeded)


@settings(max_examples=RAW_EXAMPLES, **FUZZ_SETTINGS)
@given(method=st.sampled_from(METHODS), raw=st.one_of(st.binary(max_size=64), st.sampled_from(
    (b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 8, b"\x08" + b"\xff" * 10, b"\x12\x02\x0a"))))
async def test_raw_bytes_are_refused_or_parsed_never_unknown(seeded: Stubs, controller_app, caplog, method,
                                                             raw: bytes):
    code = await _call(seeded.channel, method, [raw] if method.client_streaming else raw)
    CASES["raw"] += 1
    assert _allowed(method, code), f"{method.full_name} answered {code.name} to {raw!r}"
    _no_internal_errors(caplog)
    await _still_healthy_and_consistent(controller_app, seeded)
