"""``edgefleet operator``: operators, their roles and API tokens (admin), and ``whoami``.

The first step on a new server: with the bootstrap admin token in ``EDGEFLEET_TOKEN``,
create yourself an operator and a personal token, then use that token from then on.
"""

from __future__ import annotations

import click

from fleet_server.cli.api import ApiClient, api_options, out, paged

OPERATOR_COLUMNS = ("id", "name", "role", "created_at")
TOKEN_COLUMNS = ("id", "created_at", "expires_at", "revoked_at")


@click.group()
def operator() -> None:
    """Operators (viewer < operator < admin) and their API tokens; needs an admin token."""


@operator.command("create")
@click.argument("name")
@click.option(
    "--role",
    type=click.Choice(["viewer", "operator", "admin"]),
    default="operator",
    show_default=True,
    help="viewer reads; operator also acts (rollouts, devices); admin also manages operators.",
)
@api_options
def operator_create(api: ApiClient, as_json: bool, name: str, role: str) -> None:
    """Create an operator NAME; then give them a token with `edgefleet operator token create`."""
    out(
        api.request("POST", "/operators", json={"name": name, "role": role}),
        as_json,
        OPERATOR_COLUMNS,
    )


@operator.command("list")
@paged
@api_options
def operator_list(api: ApiClient, as_json: bool, limit: int, offset: int) -> None:
    """Every operator with their role."""
    data = api.request("GET", "/operators", params={"limit": limit, "offset": offset})
    out(data, as_json, OPERATOR_COLUMNS)


@operator.command("show")
@click.argument("name")
@api_options
def operator_show(api: ApiClient, as_json: bool, name: str) -> None:
    """One operator (id or name) and their tokens (never the secrets)."""
    op = api.request("GET", f"/operators/{name}")
    tokens = api.request("GET", f"/operators/{name}/tokens")
    if as_json:
        out({**op, "tokens": tokens}, True)
        return
    out(op, False, OPERATOR_COLUMNS)
    click.echo("")
    out({"items": tokens}, False, TOKEN_COLUMNS)


@operator.group("token")
def token() -> None:
    """An operator's API tokens: create (shown once), list, revoke."""


@token.command("create")
@click.argument("name")
@click.option(
    "--ttl-days", type=click.IntRange(1, 3650), help="Days it stays valid (default: no expiry)."
)
@api_options
def token_create(api: ApiClient, as_json: bool, name: str, ttl_days: int | None) -> None:
    """Issue a token for operator NAME; the secret is printed once, alone on stdout."""
    data = api.request("POST", f"/operators/{name}/tokens", json={"ttl_days": ttl_days})
    if as_json:
        out(data, True)
        return
    click.echo(data["token"])
    expiry = data["expires_at"] or "never"
    click.echo(
        f"token {data['id']} for {name} (expires: {expiry}); shown once. "
        "Use it with: export EDGEFLEET_TOKEN=<token>",
        err=True,
    )


@token.command("list")
@click.argument("name")
@api_options
def token_list(api: ApiClient, as_json: bool, name: str) -> None:
    """Tokens of operator NAME (ids and dates, never the secrets)."""
    out({"items": api.request("GET", f"/operators/{name}/tokens")}, as_json, TOKEN_COLUMNS)


@token.command("revoke")
@click.argument("name")
@click.argument("token_id")
@api_options
def token_revoke(api: ApiClient, as_json: bool, name: str, token_id: str) -> None:
    """Revoke token TOKEN_ID of operator NAME; requests with it are refused at once."""
    api.request("DELETE", f"/operators/{name}/tokens/{token_id}")
    click.echo(f"revoked {token_id} of {name}")


@click.command("whoami")
@api_options
def whoami(api: ApiClient, as_json: bool) -> None:
    """The operator and role behind the token in use."""
    out(api.request("GET", "/whoami"), as_json, ("operator_id", "name", "role"))
