"""`splan keys create|list|revoke` and `splan tenants list|quota`: API keys and tenants, on the database directly."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from service.auth import ALL_SCOPES, AuthError, check_tenant, create_key, parse_scopes, revoke_key

KEY_COMMANDS = ("keys", "tenants")


def add_key_commands(sub: Any, add_command: Any) -> None:
    """Register `splan keys` and `splan tenants` on the `splan` parser."""
    scopes = ",".join(sorted(ALL_SCOPES))
    keys = add_command(sub, "keys", "API keys (stored as SHA-256 digests; the key is printed once)")
    keys_sub = keys.add_subparsers(
        dest="keys_command", required=True, parser_class=sub._parser_class, metavar="COMMAND"
    )
    create = add_command(keys_sub, "create", "issue a key for a tenant (created with default quotas when new)")
    create.add_argument("--tenant", required=True, help="tenant id: a-z, 0-9, '-', '_' (1-63 characters)")
    create.add_argument("--scopes", required=True, help=f"comma-separated, of: {scopes}")
    create.add_argument("--label", default=None, help="a note kept with the key, e.g. who uses it (default: none)")
    create.add_argument("--json", action="store_true", help="print the key and its id as JSON")
    listing = add_command(keys_sub, "list", "list keys (ids, tenants, scopes, revoked or not; never the keys)")
    listing.add_argument("--tenant", default=None, help="only this tenant's keys (default: every tenant)")
    listing.add_argument("--json", action="store_true", help="print the keys as JSON")
    revoke = add_command(keys_sub, "revoke", "revoke a key by its id (the 12 hex digits after `splan_`)")
    revoke.add_argument("key_id", help="the key id `splan keys create` or `splan keys list` printed")

    tenants = add_command(sub, "tenants", "tenants and their quotas")
    tenants_sub = tenants.add_subparsers(
        dest="tenants_command", required=True, parser_class=sub._parser_class, metavar="COMMAND"
    )
    tlist = add_command(tenants_sub, "list", "list tenants with their quotas (default: the settings' values)")
    tlist.add_argument("--json", action="store_true", help="print the tenants as JSON")
    quota = add_command(tenants_sub, "quota", "set a tenant's quotas (those not given stay as they are)")
    quota.add_argument("tenant", help="tenant id (created when new)")
    quota.add_argument(
        "--plans-in-flight", type=int, default=None, help="plans queued or running at once (default: unchanged)"
    )
    quota.add_argument(
        "--plans-per-hour", type=int, default=None, help="plans submitted in any hour (default: unchanged)"
    )
    quota.add_argument(
        "--search-space", type=int, default=None, help="strategies one plan may search (default: unchanged)"
    )


def run_key_command(args: argparse.Namespace) -> int:
    """Run a keys or tenants subcommand against the configured database."""
    from sqlalchemy.exc import SQLAlchemyError

    from service.cli_service import ServiceCliError
    from service.db.session import make_engine, make_session_factory
    from service.settings import get_settings

    settings = get_settings()
    engine = make_engine(settings)
    try:
        with make_session_factory(engine)() as session:
            if args.command == "keys":
                return _keys(args, session)
            return _tenants(args, session, settings)
    except AuthError as exc:
        raise ServiceCliError(str(exc)) from None
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise ServiceCliError(
            f"cannot use the database at {settings.sqlalchemy_url()}: {first} (run `splan db upgrade` first?)"
        ) from None
    finally:
        engine.dispose()


def _keys(args: argparse.Namespace, session: Any) -> int:
    from service.db import tenants as tenant_store

    if args.keys_command == "create":
        issued = create_key(session, tenant=args.tenant, scopes=parse_scopes(args.scopes), label=args.label)
        if args.json:
            print(
                json.dumps({"key": issued.token, "id": issued.key_id, "tenant": issued.tenant, "scopes": issued.scopes})
            )
        else:
            print(issued.token)
            print(
                f"splan: key {issued.key_id} for tenant {issued.tenant} ({','.join(issued.scopes)}); shown once, "
                "only its SHA-256 is stored: send it as Authorization: Bearer or set SPLAN_API_KEY",
                file=sys.stderr,
            )
        return 0
    if args.keys_command == "list":
        if args.tenant is not None:
            check_tenant(args.tenant)
        rows = tenant_store.list_keys(session, tenant=args.tenant)
        items: list[dict[str, Any]] = [
            {
                "id": k.id,
                "tenant": k.tenant_id,
                "scopes": list(k.scopes),
                "label": k.label,
                "created_at": k.created_at.isoformat(),
                "revoked_at": k.revoked_at.isoformat() if k.revoked_at else None,
            }
            for k in rows
        ]
        if args.json:
            print(json.dumps(items, indent=2))
            return 0
        for item in items:
            state = f"revoked {item['revoked_at']}" if item["revoked_at"] else "active"
            label = f"  {item['label']}" if item["label"] else ""
            print(f"{item['id']}  {item['tenant']}  {','.join(item['scopes'])}  {state}{label}")
        return 0
    key = revoke_key(session, key_id=args.key_id)
    print(f"splan: key {key.id} of tenant {key.tenant_id} revoked", file=sys.stderr)
    return 0


def _tenants(args: argparse.Namespace, session: Any, settings: Any) -> int:
    from service.db import tenants as tenant_store

    defaults = tenant_store.Quotas(
        settings.quota_plans_in_flight, settings.quota_plans_per_hour, settings.quota_search_space
    )
    if args.tenants_command == "quota":
        check_tenant(args.tenant)
        for name in ("plans_in_flight", "plans_per_hour", "search_space"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise AuthError(f"--{name.replace('_', '-')} must be at least 1 (got {value})")
        tenant_store.set_quotas(
            session,
            tenant=args.tenant,
            plans_in_flight=args.plans_in_flight,
            plans_per_hour=args.plans_per_hour,
            search_space=args.search_space,
        )
    rows = tenant_store.list_tenants(session)
    if args.tenants_command == "quota":
        rows = [row for row in rows if row.id == args.tenant]
    items = []
    for row in rows:
        limits = tenant_store.quotas(session, tenant=row.id, defaults=defaults)
        items.append(
            {
                "tenant": row.id,
                "plans_in_flight": limits.plans_in_flight,
                "plans_per_hour": limits.plans_per_hour,
                "search_space": limits.search_space,
            }
        )
    if getattr(args, "json", False):
        print(json.dumps(items, indent=2))
        return 0
    for item in items:
        print(
            f"{item['tenant']}  plans in flight {item['plans_in_flight']}  plans per hour {item['plans_per_hour']}  "
            f"search space {item['search_space']}"
        )
    return 0
