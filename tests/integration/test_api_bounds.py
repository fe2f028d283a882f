"""Hostile input over gRPC, on SQLite and PostgreSQL: every field bounded, refused with
INVALID_ARGUMENT naming the field and the limit, a short message, and nothing written.

Every call here is refused, so the tests share one seeded controller per backend
(`shared_seeded`, tests/integration/conftest.py), each comparing the state after its call with
a read taken just before it."""

from __future__ import annotations

import grpc
import pytest

from controller import limits
from grpc_harness import Stubs, api_state, spec
from maia.v1 import admin_pb2, agent_pb2, common_pb2, deployments_pb2

MB = "x" * (1 << 20)
HUGE_INT64 = 2**63 - 1


def _submit(dry_run: bool = False, **fields):
    msg = spec("svc")
    for key, value in fields.items():
        if key.startswith("shard_"):
            setattr(msg.shard, key.removeprefix("shard_"), value)
        else:
            setattr(msg, key, value)
    return lambda s: s.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(spec=msg, dry_run=dry_run))


def _register(**fields):
    info = agent_pb2.NodeInfo(node_id="n9", hostname="n9.lab", rack="rack-a", accelerators=4,
                              accelerator_model="maia-100")
    labels = fields.pop("labels", None)
    for key, value in fields.items():
        setattr(info, key, value)
    if labels:
        info.labels.update(labels)
    return lambda s: s.agent.Register(agent_pb2.RegisterRequest(node=info))


def _tenant(**fields):
    return lambda s: s.admin.CreateTenant(admin_pb2.Tenant(id=fields.pop("id", "lab2"), **fields))


HOSTILE = [
    ("replicas 10^9", _submit(replicas=10**9),
     "deployment svc: replicas must be between 1 and 4096, got 1000000000"),
    ("replicas 10^9 dry run", _submit(dry_run=True, replicas=10**9),
     "deployment svc: replicas must be between 1 and 4096, got 1000000000"),
    ("shards 10^6 per replica", _submit(shards_per_replica=10**6),
     "deployment svc: shards_per_replica must be between 1 and 256, got 1000000"),
    ("shards per deployment", _submit(dry_run=True, replicas=4096, shards_per_replica=256),
     "deployment svc: replicas x shards_per_replica is 1048576 shards; at most 8192"),
    ("host-only shards, locality none", _submit(replicas=1000, locality=common_pb2.DOMAIN_NONE, shard_accelerators=0),
     "deployment svc: 1000 host-only shards (shard.accelerators 0); at most 256"),
    ("cpu_milli 2^63-1", _submit(shard_cpu_milli=HUGE_INT64),
     "deployment svc: shard.cpu_milli must be at most 1e+08, got 9223372036854775807"),
    ("memory 2^62", _submit(shard_memory_mib=2**62),  # was "at most 1.07374e+09, got 4.61169e+18"
     "deployment svc: shard.memory_mib must be at most 1073741824, got 4611686018427387904"),
    ("hbm NaN", _submit(shard_hbm_gib=float("nan")), "deployment svc: shard.hbm_gib must be a finite number, got nan"),
    ("power inf", _submit(shard_power_w=float("inf")), "deployment svc: shard.power_w must be a finite number, got inf"),
    ("priority 2^31-1", _submit(priority=2**31 - 1),
     "deployment svc: priority must be between -1000000 and 1000000, got 2147483647"),
    ("NUL in tenant", _submit(tenant="lab\x00"),
     "tenant id 'lab\\x00' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    # `$` matches before a final newline: a name or id ending in one passed (a tenant was created so).
    ("newline-ended name", _submit(name="svc\n"),
     "deployment name 'svc\\n' is invalid: use lowercase letters, digits and '-', starting and ending with a letter or digit"),
    ("newline-ended tenant", _submit(tenant="lab\n"),
     "tenant id 'lab\\n' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    ("1 MB name", _submit(name=MB),
     f"deployment name {repr(MB)[:40]}... (1048576 characters) is 1048576 characters long; at most 63"),
    ("100k models", lambda s: s.deployments.SubmitDeployment(deployments_pb2.SubmitDeploymentRequest(
        spec=spec("svc", models=tuple(f"m{i}" for i in range(100_000))))),
     "deployment svc: shard.accelerator_models has 100000 entries; at most 16"),
    ("get NUL name", lambda s: s.deployments.GetDeployment(deployments_pb2.GetDeploymentRequest(name="a\x00b")),
     "deployment name 'a\\x00b' is invalid: use lowercase letters, digits and '-', starting and ending with a letter or digit"),
    ("list NUL tenant", lambda s: s.deployments.ListDeployments(deployments_pb2.ListDeploymentsRequest(tenant="\x00")),
     "tenant id '\\x00' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    ("node 10^9 accelerators", _register(accelerators=10**9),
     "node n9: accelerators must be between 0 and 64, got 1000000000"),
    ("node 100k labels", _register(labels={f"k{i}": "v" for i in range(100_000)}),
     "node n9: labels has 100000 entries; at most 64"),
    ("node label value 1 MB", _register(labels={"k": MB}), "node n9: labels[k] is 1048576 characters long; at most 256"),
    ("over-long hostname", _register(hostname="h" * 300), "node n9: hostname is 300 characters long; at most 253"),
    ("NUL in hostname", _register(hostname="n9\x00evil"),
     "node n9: hostname contains a control character (U+0000) at position 2"),
    ("over-long model", _register(accelerator_model="m" * 65),
     "node n9: accelerator_model is 65 characters long; at most 64"),
    ("NUL in node id", _register(node_id="n\x009"),
     "node id 'n\\x009' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    ("node cpu 2^63-1", _register(cpu_milli=HUGE_INT64), "node n9: cpu_milli must be at most 1e+08, got 9223372036854775807"),
    ("node 1 MB id", _register(node_id=MB),
     f"node id {repr(MB)[:20]}... (1048576 characters) is 1048576 characters long; at most 128"),
    ("100k excludes", _tenant(excludes=[f"t{i}" for i in range(100_000)]),
     "tenant lab2: excludes has 100000 entries; at most 256"),
    ("reserved 1e300", _tenant(reserved_accelerators=1e300),
     "tenant lab2: reserved_accelerators must be at most 1e+07, got 1e+300"),
    ("max power NaN", _tenant(max_power_w=float("nan")), "tenant lab2: max_power_w must be a finite number, got nan"),
    ("NUL in excluded tenant", _tenant(excludes=["lab\x00"]),
     "tenant lab2: excluded tenant id 'lab\\x00' is invalid: use letters, digits, '-', '_' and '.', "
     "starting and ending with a letter or digit"),
    ("rack budget 1e300", lambda s: s.admin.ApplyTopology(admin_pb2.Topology(
        racks=[admin_pb2.Rack(id="rack-b", row="row-a", power_budget_w=1e300)])),
     "rack rack-b: power_budget_w must be at most 1e+07, got 1e+300"),
    ("token for a NUL tenant", lambda s: s.admin.CreateToken(admin_pb2.CreateTokenRequest(role="tenant", tenant="lab\x00")),
     "tenant id 'lab\\x00' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    ("revoke a 1 MB token id", lambda s: s.admin.RevokeToken(admin_pb2.RevokeTokenRequest(id=MB)),
     f"token id {repr(MB)[:20]}... (1048576 characters) is 1048576 characters long; at most 128"),
    ("list tokens of a NUL tenant", lambda s: s.admin.ListTokens(admin_pb2.ListTokensRequest(tenant="\x00")),
     "tenant id '\\x00' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
    ("cordon NUL node", lambda s: s.admin.CordonNode(admin_pb2.NodeRequest(id="n1\x00")),
     "node id 'n1\\x00' is invalid: use letters, digits, '-', '_' and '.', starting and ending with a letter or digit"),
]


@pytest.mark.parametrize(("call", "message"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
async def test_hostile_input_is_refused_naming_the_limit_and_nothing_written(shared_seeded: Stubs, call, message):
    before = await api_state(shared_seeded)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call(shared_seeded)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == message
    assert len(info.value.details()) <= limits.ERROR_MESSAGE_MAX
    assert await api_state(shared_seeded) == before


async def test_malformed_protobuf_is_invalid_argument(shared_seeded: Stubs):
    raw = shared_seeded.channel.unary_unary("/maia.v1.DeploymentService/SubmitDeployment",
                                            request_serializer=None, response_deserializer=None)
    before = await api_state(shared_seeded)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await raw(b"\x0a\xff\xff\xff\xff\x0f")  # field 1, a length that runs past the end
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "the request is not a valid protobuf message of its type (DecodeError)"
    assert await api_state(shared_seeded) == before


async def test_malformed_message_on_the_agent_stream_is_invalid_argument(shared_seeded: Stubs):
    raw = shared_seeded.channel.stream_stream("/maia.v1.NodeAgentService/Connect",
                                              request_serializer=None, response_deserializer=None)

    async def messages():
        yield b"\x0a\xff\xff\xff\xff\x0f"

    call = raw(messages())
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    finally:
        call.cancel()  # never leave the stream to the controller's shutdown
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_a_request_over_the_receive_limit_is_refused_by_grpc(shared_seeded: Stubs):
    before = await api_state(shared_seeded)
    big = "x" * (limits.MAX_RECEIVE_MESSAGE_BYTES + 1)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shared_seeded.admin.GetTenant(admin_pb2.GetTenantRequest(id=big))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert await api_state(shared_seeded) == before


async def test_error_messages_listing_many_values_are_capped(shared_seeded: Stubs):
    many = [f"ghost-{i:04d}-" + "g" * 100 for i in range(limits.EXCLUDES_MAX)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await shared_seeded.admin.CreateTenant(admin_pb2.Tenant(id="lab2", excludes=many))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    details = info.value.details()
    assert details.startswith("tenant lab2 excludes unknown tenant(s): ghost-0000-")
    assert len(details) == limits.ERROR_MESSAGE_MAX and details.endswith("more characters)")


async def test_watch_filters_are_bounded(shared_seeded: Stubs):
    call = shared_seeded.deployments.WatchDeployments(deployments_pb2.WatchDeploymentsRequest(name="x\x00" * 1000))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details().endswith("(2000 characters) is 2000 characters long; at most 63")
