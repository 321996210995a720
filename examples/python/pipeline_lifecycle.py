"""A Sluice pipeline's life from Python, with a client generated from proto/.

Finds the API through gRPC server reflection (grpcio-reflection's client, which asks
the v1alpha version), creates a generator -> PostgreSQL pipeline, waits until it is
READY, pauses it, resumes it and deletes it, waiting each time until the owning worker
has acted on the change (observed_generation catches up with generation).

Environment:
  SLUICE_SERVER           host:port of the control plane (plaintext), e.g. 127.0.0.1:50051
  SLUICE_TOKEN            an operator token (sluice-control-plane tokens create ...)
  SLUICE_DESTINATION_URL  a PostgreSQL URL the workers can reach
Arguments: [pipeline id] (default "python-example"), [records] (default 1000).

Exit status 0 when every step succeeded, 1 otherwise.
"""

import os
import sys
import time

import grpc
from google.protobuf import field_mask_pb2, struct_pb2
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from sluice.v1 import pipeline_pb2 as pb
from sluice.v1 import pipeline_pb2_grpc as rpc

TIMEOUT_S = 90.0


def log(message):
    print(f"[python-example] {message}", flush=True)


def struct(values):
    s = struct_pb2.Struct()
    s.update(values)
    return s


def status_name(value):
    return pb.PipelineStatus.Name(value).removeprefix("PIPELINE_STATUS_")


def wait_for(stub, metadata, pipeline_id, status, generation):
    """Polls until the worker reports `status` for `generation`; returns the pipeline."""
    deadline = time.monotonic() + TIMEOUT_S
    last = None
    while time.monotonic() < deadline:
        p = stub.GetPipeline(pb.GetPipelineRequest(id=pipeline_id), metadata=metadata)
        seen = (p.phase, status_name(p.status), p.observed_generation)
        if seen != last:
            log(f"  {pipeline_id}: phase {p.phase}, observed generation {p.observed_generation}/{p.generation}")
            last = seen
        if p.status == status and p.observed_generation >= generation:
            return p
        if p.status == pb.PIPELINE_STATUS_ERROR and p.observed_generation >= generation:
            raise RuntimeError(f"{pipeline_id} went to ERROR: {p.last_error}")
        time.sleep(0.2)
    raise TimeoutError(f"{pipeline_id} did not reach {status_name(status)} within {TIMEOUT_S} s")


def wait_removed(stub, metadata, pipeline_id):
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            stub.GetPipeline(pb.GetPipelineRequest(id=pipeline_id), metadata=metadata)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.NOT_FOUND:
                return
            raise
        time.sleep(0.2)
    raise TimeoutError(f"{pipeline_id} was not removed within {TIMEOUT_S} s")


def set_desired(stub, metadata, pipeline_id, desired):
    return stub.UpdatePipeline(
        pb.UpdatePipelineRequest(
            pipeline=pb.Pipeline(id=pipeline_id, desired_status=desired),
            update_mask=field_mask_pb2.FieldMask(paths=["desired_status"]),
        ),
        metadata=metadata,
    )


def main():
    server = os.environ["SLUICE_SERVER"]
    token = os.environ["SLUICE_TOKEN"]
    destination_url = os.environ["SLUICE_DESTINATION_URL"]
    pipeline_id = sys.argv[1] if len(sys.argv) > 1 else "python-example"
    records = int(sys.argv[2]) if len(sys.argv) > 2 else 1000
    metadata = [("authorization", f"Bearer {token}")]

    with grpc.insecure_channel(server) as channel:
        # Reflection needs no token and no proto files.
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
        log(f"reflection lists {', '.join(sorted(services))}")
        if "sluice.v1.PipelineService" not in services:
            raise RuntimeError("the server does not offer sluice.v1.PipelineService")

        stub = rpc.PipelineServiceStub(channel)
        spec = pb.PipelineSpec(
            source=pb.ConnectorSpec(type="generator", config=struct({"count": records, "seed": 7})),
            destination=pb.ConnectorSpec(
                type="postgres",
                config=struct({"url": destination_url, "table": pipeline_id.replace("-", "_")}),
            ),
        )
        created = stub.CreatePipeline(
            pb.CreatePipelineRequest(
                pipeline_id=pipeline_id,
                pipeline=pb.Pipeline(spec=spec, desired_status=pb.DESIRED_STATUS_ACTIVE),
            ),
            metadata=metadata,
        )
        log(f"created {created.id} (generation {created.generation}); waiting for READY")
        wait_for(stub, metadata, pipeline_id, pb.PIPELINE_STATUS_READY, created.generation)

        paused = set_desired(stub, metadata, pipeline_id, pb.DESIRED_STATUS_PAUSED)
        log(f"pause requested (generation {paused.generation})")
        wait_for(stub, metadata, pipeline_id, pb.PIPELINE_STATUS_PAUSED, paused.generation)

        resumed = set_desired(stub, metadata, pipeline_id, pb.DESIRED_STATUS_ACTIVE)
        log(f"resume requested (generation {resumed.generation})")
        wait_for(stub, metadata, pipeline_id, pb.PIPELINE_STATUS_READY, resumed.generation)

        events = stub.ListPipelineEvents(
            pb.ListPipelineEventsRequest(pipeline_id=pipeline_id), metadata=metadata
        ).events
        log("history: " + ", ".join(f"{e.from_status or '-'}>{e.to_status}" for e in events))

        stub.DeletePipeline(pb.DeletePipelineRequest(id=pipeline_id), metadata=metadata)
        log("delete requested; waiting until it is removed")
        wait_removed(stub, metadata, pipeline_id)
        log("done: created, READY, paused, resumed, deleted")


if __name__ == "__main__":
    try:
        main()
    except (grpc.RpcError, RuntimeError, TimeoutError, KeyError) as e:
        if isinstance(e, grpc.RpcError):
            print(f"[python-example] error: {e.code().name}: {e.details()}", file=sys.stderr)
        elif isinstance(e, KeyError):
            print(f"[python-example] error: environment variable {e} is not set", file=sys.stderr)
        else:
            print(f"[python-example] error: {e}", file=sys.stderr)
        sys.exit(1)
