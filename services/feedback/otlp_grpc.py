"""OTLP/gRPC trace intake: OpenTelemetry's `TraceService/Export` on its own port (4317 by default, as
exporters expect), authenticated by the same API keys and mapped by the same intake as `POST /v1/traces`.

The body is decoded here, not by gRPC, so a malformed one is answered INVALID_ARGUMENT with the reason
rather than gRPC's bare INTERNAL. Codes follow OTLP's rules for retries: UNAVAILABLE (Kafka did not
take the spans; the exporter retries and the spans keep their event ids) is the only retryable one
answered here; a request past gRPC's message bound is refused by gRPC itself with RESOURCE_EXHAUSTED
before any of it is read.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from contracts.http import Role
from services.feedback import otlp
from services.feedback.otlp_intake import BrokerUnavailable, TraceIntake
from services.runtime.auth import Authenticator, Principal
from services.runtime.http import DoorError, RefusalLog

log = logging.getLogger("flywheel.feedback.otlp")

SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"
METHOD_PATH = f"/{SERVICE}/Export"
# Calls decoded and published at once; more wait in gRPC's queue until this many more are refused with
# RESOURCE_EXHAUSTED, which bounds the memory a burst of large exports can take.
MAX_CONCURRENT_EXPORTS = 16
MAX_QUEUED_EXPORTS = 64
STOP_GRACE_S = 5.0

# The gRPC code each door status becomes.
_CODES = {
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    503: grpc.StatusCode.UNAVAILABLE,
}


class Refusal(Exception):
    """A call answered with `code` and `message` instead of a response."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class TraceExportServicer:
    """Export, as OTLP/gRPC defines it, over the shared intake."""

    def __init__(self, intake: TraceIntake, auth: Authenticator, refusals: RefusalLog) -> None:
        self._intake = intake
        self._auth = auth
        self._refusals = refusals
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_EXPORTS)

    async def export(self, body: bytes, context: grpc.aio.ServicerContext) -> ExportTraceServiceResponse:
        try:
            caller = await self._caller(context)
            async with self._slots:
                # Decoding, mapping and scrubbing thousands of spans is CPU work: off the event loop.
                mapped = await asyncio.to_thread(self._decode_and_map, body, caller.name)
                try:
                    return await self._intake.publish(mapped, transport="grpc")
                except BrokerUnavailable as error:
                    raise Refusal(grpc.StatusCode.UNAVAILABLE, str(error)) from None
        except Refusal as refusal:
            await context.abort(refusal.code, refusal.message)
            raise AssertionError("unreachable: abort raises") from None

    async def _caller(self, context: grpc.aio.ServicerContext) -> Principal:
        metadata = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
        scheme, _, key = metadata.get("authorization", "").partition(" ")
        try:
            # Checking a key may ask the registry's database: off the event loop, as FastAPI does for the HTTP doors.
            return await asyncio.to_thread(
                self._auth.authorise, key.strip() if scheme.lower() == "bearer" else None, Role.app
            )
        except DoorError as error:
            self._refused(error.status, error.detail.code)
            message = str(error.detail.message).replace(
                "`Authorization: Bearer <key>`", "metadata `authorization: Bearer <key>`"
            )
            raise Refusal(_CODES.get(error.status, grpc.StatusCode.UNAUTHENTICATED), message) from None

    def _decode_and_map(self, body: bytes, principal: str) -> otlp.Mapped:
        try:
            return self._intake.map(otlp.decode(body, otlp.PROTOBUF), principal)
        except otlp.Undecodable as error:
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{error}; nothing was stored") from None
        except otlp.TooLarge as error:
            # Not RESOURCE_EXHAUSTED: exporters retry that, and the same request is refused again every time.
            raise Refusal(grpc.StatusCode.INVALID_ARGUMENT, f"{error}; nothing was stored") from None

    def _refused(self, status: int, code: str | None) -> None:
        if status in (401, 403):
            self._refusals.record(status, code, METHOD_PATH)


class OtlpGrpcServer:
    """The gRPC server of the intake, started and stopped with the process (Service hooks)."""

    def __init__(self, servicer: TraceExportServicer, *, host: str, port: int, max_message_bytes: int) -> None:
        self._servicer = servicer
        self._address = f"{host}:{port}"
        self._max_message_bytes = max_message_bytes
        self._server: grpc.aio.Server | None = None
        self.port: int | None = None

    async def start(self) -> None:
        server = grpc.aio.server(
            maximum_concurrent_rpcs=MAX_CONCURRENT_EXPORTS + MAX_QUEUED_EXPORTS,
            options=[
                # gRPC checks the size of a compressed message again once inflated: a gzip bomb is refused
                # at this bound too.
                ("grpc.max_receive_message_length", self._max_message_bytes),
                ("grpc.max_send_message_length", 4 * 1024 * 1024),
                # Replicas of the sink on one host share the port; the kernel spreads connections.
                ("grpc.so_reuseport", 1),
            ],
        )
        handler = grpc.unary_unary_rpc_method_handler(
            self._servicer.export,
            request_deserializer=None,  # raw bytes: the servicer decodes and explains a bad body
            response_serializer=ExportTraceServiceResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, {"Export": handler}),))
        try:
            self.port = server.add_insecure_port(self._address)
        except RuntimeError as error:
            raise RuntimeError(
                f"the OTLP/gRPC intake cannot listen on {self._address} ({error}): free the port, or set "
                "FLYWHEEL_FEEDBACK_OTLP_GRPC_PORT to another port, or to 0 to serve no gRPC intake"
            ) from None
        await server.start()
        self._server = server
        log.info("OTLP/gRPC trace intake listening on %s", self._address.rsplit(":", 1)[0] + f":{self.port}")

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(STOP_GRACE_S)
            self._server = None
