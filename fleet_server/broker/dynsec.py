"""Mosquitto's dynamic security plugin: broker rules that admit a device to its own topics.

Why not the file ACL: Mosquitto grants every SUBSCRIBE under ``acl_file`` and filters
only at delivery. A device that subscribes to the server's shared group
(``$share/edgefleet-ingest/...``) becomes a member of it, the broker hands it its
share of every device's telemetry and then drops that share because the device may not
read it; the publishers already had their PUBACK, so those records are gone. The
dynamic security plugin (``mosquitto_dynamic_security.so``) checks a subscription when
it is made and refuses what no role grants.

Rules (default deny for publish, receive and subscribe):

* every device gets its own role ``edgefleet-device-{id}``: publish to
  ``edgefleet/v1/devices/{id}/telemetry/+`` and ``.../{id}/status``, subscribe to and
  receive ``.../{id}/notify`` and ``.../{id}/status`` -- literal topics, no wildcard and
  no ``$share`` outside its subtree (Mosquitto 2.0's plugin has no ``%u`` patterns, so
  the role names the id);
* the server role reads and writes ``edgefleet/v1/#`` and may join the ingest share
  group;
* an admin role may use ``$CONTROL/dynamic-security/#``: the server adds and removes
  devices at run time through it (:class:`DynsecControl`), also on a broker it did not
  start.

This module is pure apart from :class:`DynsecControl` (one short MQTT session per
call).
"""

from __future__ import annotations

import json
import queue
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.protocol import TELEMETRY_KINDS, TOPIC_ROOT
from device_agent.transport.mqtt import MqttSession, TlsOptions

#: where Debian and Ubuntu's ``mosquitto`` package ship the plugin
PLUGIN_PATHS = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
)
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
SERVER_ROLE = "edgefleet-server"
ADMIN_ROLE = "edgefleet-broker-admin"
ADMIN_USER = "edgefleet-broker-admin"
DEVICE_ROLE_PREFIX = "edgefleet-device-"


class DynsecError(RuntimeError):
    """The broker refused or did not answer a dynamic-security command."""


def find_plugin() -> Path | None:
    """The dynamic security plugin's path on this machine, or None."""
    for p in PLUGIN_PATHS:
        if Path(p).is_file():
            return Path(p)
    return None


def _acl(kind: str, topic: str) -> dict[str, Any]:
    return {"acltype": kind, "topic": topic, "priority": 0, "allow": True}


def device_role(device_id: str) -> dict[str, Any]:
    """The role of one device: its own topics, literally."""
    own = f"{TOPIC_ROOT}/{device_id}"
    acls = [_acl("publishClientSend", f"{own}/telemetry/{k}") for k in TELEMETRY_KINDS]
    acls += [
        _acl("publishClientSend", f"{own}/status"),
        _acl("subscribeLiteral", f"{own}/notify"),
        _acl("subscribeLiteral", f"{own}/status"),
        _acl("publishClientReceive", f"{own}/notify"),
        _acl("publishClientReceive", f"{own}/status"),
    ]
    return {"rolename": DEVICE_ROLE_PREFIX + device_id, "acls": acls}


def server_role() -> dict[str, Any]:
    """The fleet server: every device topic, and the ingest share group."""
    root = TOPIC_ROOT.split("/devices")[0]  # edgefleet/v1
    return {
        "rolename": SERVER_ROLE,
        "acls": [
            _acl("publishClientSend", f"{root}/#"),
            _acl("publishClientReceive", f"{root}/#"),
            _acl("subscribePattern", f"{root}/#"),
            _acl("subscribePattern", f"$share/+/{root}/#"),
        ],
    }


def admin_role() -> dict[str, Any]:
    return {
        "rolename": ADMIN_ROLE,
        "acls": [
            _acl("publishClientSend", "$CONTROL/dynamic-security/#"),
            _acl("publishClientReceive", "$CONTROL/dynamic-security/#"),
            _acl("subscribePattern", "$CONTROL/dynamic-security/#"),
        ],
    }


def _hash_fields(stored: str) -> dict[str, Any]:
    """Mosquitto's ``$7$iterations$salt$hash`` as the plugin's password fields."""
    _, kind, iterations, salt, digest = stored.split("$")
    if kind != "7":
        raise ValueError("only $7$ (PBKDF2-SHA512) password hashes can be converted")
    return {"password": digest, "salt": salt, "iterations": int(iterations)}


def config_document(
    users: Mapping[str, str], *, server_users: Sequence[str], admin_users: Sequence[str] = ()
) -> dict[str, Any]:
    """The plugin's JSON file for ``users`` (username -> ``$7$`` hash).

    Users in ``server_users`` get the server role, those in ``admin_users`` the admin
    role, every other user the role of the device with that id.
    """
    roles = [server_role(), admin_role()]
    clients = []
    for user, stored in sorted(users.items()):
        if user in server_users:
            rolename = SERVER_ROLE
        elif user in admin_users:
            rolename = ADMIN_ROLE
        else:
            role = device_role(user)
            roles.append(role)
            rolename = role["rolename"]
        client: dict[str, Any] = {"username": user, "roles": [{"rolename": rolename}]}
        if stored:
            client.update(_hash_fields(stored))
        clients.append(client)
    return {
        "defaultACLAccess": {
            "publishClientSend": False,
            "publishClientReceive": False,
            "subscribe": False,
            "unsubscribe": True,
        },
        "clients": clients,
        "groups": [],
        "roles": roles,
    }


def add_client_commands(username: str, password: str | None, rolename: str) -> list[dict[str, Any]]:
    """Commands that (re)create a client holding an existing role."""
    client: dict[str, Any] = {
        "command": "createClient",
        "username": username,
        "roles": [{"rolename": rolename}],
    }
    if password is not None:
        client["password"] = password
    return [{"command": "deleteClient", "username": username}, client]


def add_device_commands(device_id: str, password: str | None) -> list[dict[str, Any]]:
    """Commands that (re)create a device's role and client; no password for certificate
    clients (``use_identity_as_username``)."""
    role = device_role(device_id)
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": role["rolename"]},
        {"command": "createRole", **role},
        *add_client_commands(device_id, password, role["rolename"])[1:],
    ]


def remove_device_commands(device_id: str) -> list[dict[str, Any]]:
    """Commands that delete a device (the broker disconnects its sessions at once)."""
    return [
        {"command": "deleteClient", "username": device_id},
        {"command": "deleteRole", "rolename": DEVICE_ROLE_PREFIX + device_id},
    ]


#: errors that mean "already in the wanted state" for a delete
_ABSENT = ("not found",)


def check_responses(commands: Sequence[Mapping[str, Any]], responses: Sequence[Any]) -> None:
    """Raise :class:`DynsecError` for a failed command (a delete of something absent is
    not a failure)."""
    for cmd, resp in zip(commands, responses, strict=False):
        err = resp.get("error") if isinstance(resp, dict) else None
        if not err:
            continue
        if str(cmd.get("command", "")).startswith("delete") and any(
            a in str(err).lower() for a in _ABSENT
        ):
            continue
        raise DynsecError(f"broker refused {cmd.get('command')}: {err}")
    if len(responses) < len(commands):
        raise DynsecError(f"broker answered {len(responses)} of {len(commands)} commands")


@dataclass(frozen=True)
class ControlEndpoint:
    """Where and as whom to send dynamic-security commands."""

    host: str
    port: int
    username: str
    password: str
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


class DynsecControl:
    """Sends dynamic-security commands and waits for the broker's answer."""

    def __init__(self, endpoint: ControlEndpoint, *, timeout: float = 10.0) -> None:
        self.endpoint = endpoint
        self.timeout = timeout

    def run(self, commands: list[dict[str, Any]]) -> None:
        """Run ``commands`` in one request; :class:`DynsecError` if any failed."""
        if not commands:
            return
        responses = self._request({"commands": commands})
        check_responses(commands, responses)

    def _request(self, body: dict[str, Any]) -> list[Any]:
        ep = self.endpoint
        tls = (
            TlsOptions(
                Path(ep.ca_file),
                Path(ep.cert_file) if ep.cert_file else None,
                Path(ep.key_file) if ep.key_file else None,
            )
            if ep.ca_file
            else None
        )
        session = MqttSession(
            f"edgefleet-dynsec-{secrets.token_hex(4)}",
            ep.host,
            ep.port,
            username=ep.username,
            password=ep.password,
            tls=tls,
            mqtt_version=5,
            subscriptions=[(RESPONSE_TOPIC, 1)],
            name="dynsec",
        ).start()
        try:
            if not session.subscribed.wait(self.timeout):
                raise DynsecError(
                    f"the broker at {ep.host}:{ep.port} did not let {ep.username} subscribe "
                    f"to {RESPONSE_TOPIC} ({session.last_error or 'no answer'}); check the "
                    "admin credentials and that the dynamic security plugin is loaded"
                )
            session.publish(CONTROL_TOPIC, json.dumps(body).encode())
            try:
                answer = session.messages.get(timeout=self.timeout)
            except queue.Empty:
                raise DynsecError(
                    f"the broker did not answer a dynamic-security command in {self.timeout}s"
                ) from None
        finally:
            session.stop()
        try:
            responses = json.loads(answer.payload)["responses"]
        except (ValueError, KeyError, TypeError) as e:
            raise DynsecError(
                f"unreadable dynamic-security answer: {answer.payload[:200]!r}"
            ) from e
        return list(responses)


__all__ = [
    "ADMIN_USER",
    "ControlEndpoint",
    "DynsecControl",
    "DynsecError",
    "add_client_commands",
    "add_device_commands",
    "config_document",
    "device_role",
    "find_plugin",
    "remove_device_commands",
]
