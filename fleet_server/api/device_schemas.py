"""Request and response bodies of the device API (see :mod:`device_agent.protocol`)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from device_agent.protocol import (
    MAX_REPORT_BYTES,
    MAX_REPORT_EXTRA_FIELDS,
    MAX_REPORTS_PER_BATCH,
)

LABEL_KEY = r"^[A-Za-z0-9][A-Za-z0-9_.\-/]{0,62}$"
DEVICE_ID = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$"


class EnrollRequest(BaseModel):
    enrollment_token: str = Field(min_length=1, max_length=200)
    device_id: str | None = Field(
        default=None,
        pattern=DEVICE_ID,
        description="Requested device id; the server picks one when omitted.",
    )
    device_class: str = Field(min_length=1, max_length=100)
    labels: dict[str, str] = Field(default_factory=dict, max_length=64)
    csr: str | None = Field(
        default=None,
        max_length=16384,
        description="PEM certificate signing request made with the device's own key; "
        "required when the server has a fleet CA (ca_dir).",
    )


class MqttEndpoint(BaseModel):
    """Where the device sends telemetry: images need no hand-typed broker address."""

    host: str
    port: int
    mqtt_version: int
    tls: bool = False
    #: the fleet CA (PEM) the broker's certificate chains to, when ``tls``
    ca_pem: str | None = None


class EnrollResponse(BaseModel):
    device_id: str
    credential: str | None = Field(
        default=None,
        description="Bearer credential, shown once (the server stores only its hash); "
        "null for a device enrolled with a certificate, which authenticates by it.",
    )
    device_class: str
    labels: dict[str, str]
    mqtt: MqttEndpoint | None = Field(
        default=None, description="The MQTT broker to use; null when the server has none."
    )
    certificate: str | None = Field(
        default=None, description="The device's client certificate (PEM), for a CSR."
    )
    ca_pem: str | None = Field(
        default=None,
        description="The fleet CA (PEM) the server's and the broker's certificates chain "
        "to; with ``certificate``.",
    )


class CertificateRenewal(BaseModel):
    csr: str = Field(
        min_length=1,
        max_length=16384,
        description="PEM certificate signing request, signed by the key it names.",
    )


class CertificateIssued(BaseModel):
    certificate: str = Field(description="The new client certificate (PEM), CN = device id.")
    not_after: datetime


class BundleRef(BaseModel):
    bundle_id: str
    name: str
    version: int
    url: str
    sha256: str
    size: int


class TelemetryPolicyOut(BaseModel):
    sample_rate: float
    window_seconds: float


class AssignmentPublic(BaseModel):
    device_id: str
    assignment_id: str
    desired: BundleRef | None
    shadow: BundleRef | None
    rollout_id: str | None
    stage: int | None
    telemetry: TelemetryPolicyOut


class Report(BaseModel):
    """An install or health report; unknown fields are kept in the stored body, within
    bounds: at most ``MAX_REPORT_EXTRA_FIELDS`` of them, ``MAX_REPORT_BYTES`` for the
    whole report as JSON, and finite numbers only (``1e999999`` is refused)."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    type: Literal["install", "health"]
    outcome: str | None = Field(default=None, max_length=20)
    name: str | None = Field(default=None, max_length=200)
    version: int | None = Field(default=None, ge=0, le=2**31 - 1)
    error_code: str | None = Field(default=None, max_length=100)
    message: str | None = Field(default=None, max_length=4000)
    state: str | None = Field(default=None, max_length=100)
    ts: float | None = Field(default=None, allow_inf_nan=False)
    bundle_id: str | None = Field(default=None, max_length=40)
    rollout_id: str | None = Field(default=None, max_length=40)
    health: str | None = Field(default=None, max_length=20)

    @model_validator(mode="after")
    def _bounded(self) -> Report:
        extra = self.model_extra or {}
        if len(extra) > MAX_REPORT_EXTRA_FIELDS:
            raise ValueError(
                f"a report has {len(extra)} unknown fields, above {MAX_REPORT_EXTRA_FIELDS}"
            )
        try:
            size = len(json.dumps(self.model_dump(mode="python"), allow_nan=False))
        except ValueError as e:  # NaN or infinity (e.g. 1e999999) in an unknown field
            raise ValueError("a report holds a number that is not finite") from e
        except (TypeError, RecursionError) as e:
            raise ValueError(f"a report cannot be stored as JSON: {e}") from e
        if size > MAX_REPORT_BYTES:
            raise ValueError(f"a report is {size} bytes as JSON, above {MAX_REPORT_BYTES}")
        return self


class ReportBatch(BaseModel):
    reports: list[Report] = Field(max_length=MAX_REPORTS_PER_BATCH)


class ReportAck(BaseModel):
    accepted: int


def report_body(r: Report) -> dict[str, Any]:
    return r.model_dump(mode="json", exclude_none=True)
