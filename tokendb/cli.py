"""The ``tokendb`` command: a thin shell over the library.

Each command opens the database (``--database-url``, else ``DATABASE_URL``,
else the embedded server; see :func:`tokendb.config.resolve_database`), calls
one public operation and prints the result: a rich table (one line a row,
fitting the terminal, ids shortened; ``--wide`` for every column in full),
or JSON with ``--json``. Secrets are printed once, by ``keys issue``;
password and key hashes never.

Exit codes (:func:`main`): 0 success; 1 the operation failed (a
:class:`~tokendb.TokenDBError`: a refused key, an unknown user, books that
do not balance …); 2 a usage error (an unknown option, a missing argument);
130 interrupted. Every error is one ``Error: …`` line on stderr, never a
traceback.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from uuid import UUID

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from tortoise.models import Model

import tokendb
from tokendb import config, embedded
from tokendb.errors import TokenDBError
from tokendb.models import public_fields
from tokendb.usage import GROUPINGS

__all__ = ["app", "main"]

T = TypeVar("T")


app = typer.Typer(
    name="tokendb",
    help="tokendb: users, API keys, a token ledger and billed chats on PostgreSQL.\n\n"
    "The database is --database-url, else DATABASE_URL (environment or .env), "
    "else tokendb's embedded server (pip install 'tokendb[embedded]').\n\n"
    "Example: tokendb demo",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Help texts are plain text: rich markup would eat `[embedded]`, `[tool.aerich]`.
    rich_markup_mode=None,
)
users_app = typer.Typer(
    help="Create and look up users.\n\nExample: tokendb users list",
    no_args_is_help=True,
    rich_markup_mode=None,
)
keys_app = typer.Typer(
    help="Issue, list, verify and revoke API keys.\n\n"
    "Example: tokendb keys list --user ada@example.com",
    no_args_is_help=True,
    rich_markup_mode=None,
)
tokens_app = typer.Typer(
    help="Move tokens and read the ledger.\n\n"
    "Example: tokendb tokens balance --user ada@example.com",
    no_args_is_help=True,
    rich_markup_mode=None,
)
holds_app = typer.Typer(
    help="List, release and expire token holds.\n\n"
    "Example: tokendb holds list --user ada@example.com --status active",
    no_args_is_help=True,
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Manage the embedded PostgreSQL server (used when DATABASE_URL is unset).\n\n"
    "Example: tokendb db start",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(users_app, name="users")
app.add_typer(keys_app, name="keys")
app.add_typer(tokens_app, name="tokens")
app.add_typer(holds_app, name="holds")
app.add_typer(db_app, name="db")

out = Console()
err = Console(stderr=True)
_wide = Console(width=100_000)  # --wide tables: as wide as their contents

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
UserOption = Annotated[str, typer.Option("--user", "-u", help="The user's id or email.")]
DescriptionOption = Annotated[
    str | None, typer.Option("--description", "-d", help="Shown in the ledger.")
]
ReferenceOption = Annotated[
    str | None,
    typer.Option("--reference-id", help="Idempotency key (a UUID): a repeat moves nothing."),
]


@dataclasses.dataclass
class _State:
    database_url: str | None = None


@app.callback()
def _root(
    ctx: typer.Context,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            help="PostgreSQL URL (default: DATABASE_URL, else the embedded server).",
            metavar="URL",
        ),
    ] = None,
) -> None:
    ctx.obj = _State(database_url=database_url)


# --- plumbing ---------------------------------------------------------------------------


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]Error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


def _usage_error(message: str) -> NoReturn:
    _fail(_escape(message), code=2)


def _embedded(action: Callable[[], T]) -> T:
    """Run ``action`` (a blocking call, into :mod:`tokendb.embedded` or pure); errors as
    :func:`_run`."""
    try:
        return action()
    except TokenDBError as exc:
        _fail(_escape(str(exc)))


def _run(
    ctx: typer.Context,
    action: Callable[[], Awaitable[T]],
    *,
    connect: bool = True,
    **options: Any,
) -> T:
    """Run ``action`` with tokendb connected (``options`` go to :func:`tokendb.init`);
    a TokenDBError becomes a one-line error."""
    state: _State = ctx.ensure_object(_State)

    async def main() -> T:
        if not connect:
            return await action()
        async with tokendb.connect(state.database_url, **options):
            return await action()

    try:
        return _embedded(lambda: asyncio.run(main()))
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def _escape(text: str) -> str:
    return text.replace("[", "\\[")


def _public(value: Any) -> Any:
    """A model or dataclass as a dict of its fields (hidden columns left out); else ``value``."""
    if isinstance(value, Model):
        return {name: getattr(value, name) for name in public_fields(type(value))}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value


def _jsonable(value: Any) -> Any:
    """``value`` as plain JSON data."""
    value = _public(value)
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, (UUID, Path)):
        return str(value)
    return value


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, enum.Enum):
        return str(value.value)
    if isinstance(value, (list, tuple)):
        return ", ".join(_cell(item) for item in value)
    return str(value)


_NARROW_COLUMNS: dict[str, dict[str, str]] = {
    # Per model: the columns a narrow table shows, and their headers.
    "User": {
        "id": "id",
        "email": "email",
        "name": "name",
        "role": "role",
        "token_balance": "balance",
        "created_at": "created",
    },
    "ApiKey": {
        "id": "id",
        "name": "name",
        "key_prefix": "prefix",
        "permissions": "permissions",
        "is_active": "active",
        "last_used_at": "last used",
        "expires_at": "expires",
    },
    "TokenTransaction": {
        "id": "id",
        "type": "type",
        "amount": "amount",
        "balance_after": "balance",
        "description": "description",
        "created_at": "created",
    },
}

WideOption = Annotated[
    bool, typer.Option("--wide", help="Every column, ids in full, however wide the table.")
]


def _short(value: Any) -> Any:
    """A UUID as its last 8 hex digits (the random part of a UUIDv7), a datetime to the minute."""
    if isinstance(value, UUID):
        return "…" + value.hex[-8:]
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M")
    return value


def _fit(columns: dict[str, str], cells: list[list[str]]) -> list[int]:
    """Column widths that fit the terminal: the widest columns give way first (emails,
    names, descriptions), down to 6 characters; ids and times only if that is not enough."""
    widths = [
        max([len(header)] + [len(row[index]) for row in cells])
        for index, header in enumerate(columns.values())
    ]
    budget = out.width - 3 * len(widths)  # padding and a gap around every column
    kept_whole = {i for i, name in enumerate(columns) if name == "id" or name.endswith("_at")}
    for shrinkable in (set(range(len(widths))) - kept_whole, kept_whole - {0}):
        while sum(widths) > budget and shrinkable:
            index = max(shrinkable, key=lambda i: widths[i])
            if widths[index] <= 6:
                break
            widths[index] -= 1
    return widths


def _emit(value: Any, *, as_json: bool, title: str | None = None, wide: bool = False) -> None:
    """Print a model, a list of models or a dataclass: as JSON, or as a rich table.

    A list is one line a row: in the terminal's width (80 columns when it is
    not a terminal), ids shortened and long cells cut with an ellipsis; or,
    ``wide``, every column in full.
    """
    if as_json:
        typer.echo(json.dumps(_jsonable(value), indent=2, ensure_ascii=False))
        return
    if isinstance(value, list):
        rows = [_public(item) for item in value]
        columns = {name: name for name in rows[0]} if rows else {"(none)": "(none)"}
        kind = type(value[0]).__name__ if value else ""
        if not wide and kind in _NARROW_COLUMNS:
            columns = _NARROW_COLUMNS[kind]
        cells = [
            [_escape(_cell(row[name] if wide else _short(row[name]))) for name in columns]
            for row in rows
        ]
        if wide:
            table = Table(title=title)
            for header in columns.values():
                table.add_column(header, no_wrap=True)
        else:
            table = Table(
                title=f"{title} (--wide: all columns)", box=box.SIMPLE_HEAD, show_edge=False
            )
            for header, width in zip(columns.values(), _fit(columns, cells), strict=True):
                table.add_column(header, no_wrap=True, overflow="ellipsis", width=width)
        for row_cells in cells:
            table.add_row(*row_cells)
        (_wide if wide else out).print(table)
        return
    table = Table(title=title, show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for key, item in _public(value).items():
        table.add_row(key, _escape(_cell(item)))
    out.print(table)


async def _user_id(user: str) -> str:
    """A user given as an id or an email, as an id."""
    if "@" in user:
        return str((await tokendb.get_user(email=user)).id)
    return user


# --- migrate and demo -------------------------------------------------------------------


@app.command()
def migrate(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Apply tokendb's pending migrations (the same as `aerich upgrade`).

    Example: tokendb migrate
    """
    state: _State = ctx.ensure_object(_State)
    applied = _run(ctx, lambda: tokendb.migrate(state.database_url), connect=False)
    if as_json:
        typer.echo(json.dumps({"applied": applied}))
    elif applied:
        out.print(f"Applied {len(applied)} migration(s): " + ", ".join(applied))
    else:
        out.print("The schema is up to date.")


@app.command("app-migration")
def app_migration(
    ctx: typer.Context,
    app_label: Annotated[str, typer.Argument(metavar="APP", help="Your Tortoise app's label.")],
    name: Annotated[str, typer.Option("--name", help="The migration's name.")] = "init",
    config_file: Annotated[
        Path, typer.Option("--config", help="The file with [tool.aerich] or [tool.tortoise].")
    ] = Path("pyproject.toml"),
) -> None:
    """Write your app's next Aerich migration (foreign keys to tokendb's models allowed).

    For your own Tortoise app next to tokendb's: `aerich migrate`, told about
    tokendb's models. Aerich alone copies tokendb's tables into your first
    migration (`aerich init-db`) and fails on a new model or a new foreign
    key that refers to tokendb's models. Reads [tool.aerich] (or
    [tool.tortoise]) as aerich does; apply with `aerich --app APP upgrade`
    after `tokendb migrate`.

    Example: tokendb app-migration shop --name projects
    """
    from tokendb.apps import aerich_settings, write_app_migration

    async def write() -> Path | None:
        apps, location = aerich_settings(config_file)
        return await write_app_migration(apps, app_label, location, name=name)

    written = _run(ctx, write, connect=False)
    if written is None:
        out.print(f"No changes in app {app_label!r}: nothing written.", soft_wrap=True)
    else:
        # soft_wrap: the command stays on one line, to be copied.
        out.print(
            f"Wrote {written}; apply it with `aerich --app {app_label} upgrade`.", soft_wrap=True
        )


@app.command()
def grant(
    ctx: typer.Context,
    role: Annotated[str, typer.Argument(help="The application role (it must exist).")],
    sql: Annotated[
        bool, typer.Option("--sql", help="Print the statements instead of running them.")
    ] = False,
) -> None:
    """Let ROLE run tokendb: DML on its tables, SELECT on Aerich's; nothing more.

    Run it as the owner of tokendb's tables (where you run `tokendb migrate`);
    the application then connects as ROLE. The database refuses what would
    break the books to every role but the owner.

    Example: tokendb grant gateway
    """
    from tokendb import schema

    if sql:
        statements = _embedded(lambda: schema.grant_sql(role))
        typer.echo("".join(f"{statement};\n" for statement in statements), nl=False)
        return
    state: _State = ctx.ensure_object(_State)
    statements = _run(
        ctx, lambda: schema.grant(role=role, database_url=state.database_url), connect=False
    )
    out.print(f"Granted {role} what the application role needs ({len(statements)} statements).")


@app.command()
def demo(
    ctx: typer.Context,
    users: Annotated[
        int,
        typer.Option("--users", min=0, help="First seed this many users (weak demo passwords)."),
    ] = 0,
    as_json: JsonOption = False,
) -> None:
    """Run the end-to-end scenario: user, API key, billed chat, top-up, refund, ledger, audit.

    Exits 1 if the books do not balance afterwards.

    Example: tokendb demo --users 1000
    """
    from tokendb.demo import run_demo

    if users and not as_json:
        with Progress(
            TextColumn("Seeding users"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=err,
        ) as progress:
            task = progress.add_task("seed", total=users)
            report = _run(
                ctx, lambda: run_demo(seed=users, on_progress=lambda n: progress.advance(task, n))
            )
    else:
        report = _run(ctx, lambda: run_demo(seed=users))
    if as_json:
        summary = _jsonable(report) | {"books_balance": report.books_balance}
        typer.echo(json.dumps(summary, indent=2))
    else:
        _print_demo(report)
    if not report.books_balance:
        raise typer.Exit(1)


def _print_demo(report: Any) -> None:
    if report.seeded_users:
        out.print(f"Seeded {report.seeded_users} users.")
    out.print(f"Created user [bold]{report.user.email}[/] ({report.user.id}).")
    scopes = ", ".join(report.api_key.permissions)
    out.print(
        f"Issued API key {report.api_key.key_prefix}… (scopes: {scopes}); "
        f"verified: {'yes' if report.key_verified else 'NO'}."
    )
    billed = sum(message.tokens for message in report.messages)
    out.print(
        f"Chat {report.chat.id} on {report.chat.model}: {len(report.messages)} messages, "
        f"{billed} tokens billed."
    )
    out.print(f"Topped up {report.top_up.amount} tokens; refunded {report.refund.amount} tokens.")
    out.print(f"Balance: [bold]{report.balance}[/] tokens.")
    _emit(
        [
            {
                "created_at": tx.created_at,
                "type": tx.type,
                "amount": f"{tx.amount:+d}",
                "balance_after": tx.balance_after,
                "description": tx.description,
            }
            for tx in report.ledger
        ],
        as_json=False,
        title="Ledger (newest first)",
    )
    if report.books_balance:
        out.print("Audit: [green]the books balance[/] (balance = Σ ledger, every chain intact).")
    else:
        err.print(
            f"Audit: [red]{len(report.ledger_discrepancies)} ledger and "
            f"{len(report.chat_discrepancies)} chat discrepancies[/]"
        )


# --- users ------------------------------------------------------------------------------


@users_app.command("create")
def users_create(
    ctx: typer.Context,
    email: Annotated[str, typer.Option("--email", "-e", help="Stored lowercased.")],
    name: Annotated[str, typer.Option("--name", "-n", help="Display name.")],
    password: Annotated[
        str | None,
        typer.Option(
            "--password",
            help="At least 8 characters (visible in the process list: prefer "
            "--password-stdin, or the prompt).",
        ),
    ] = None,
    password_stdin: Annotated[
        bool,
        typer.Option("--password-stdin", help="Read the password from the first line of stdin."),
    ] = False,
    role: Annotated[str, typer.Option("--role", help="user or admin.")] = "user",
    as_json: JsonOption = False,
) -> None:
    """Register a user (with the signup bonus). Without --password(-stdin), prompts for it.

    Example: tokendb users create -e ada@example.com -n Ada --password-stdin < password.txt
    """
    secret = _password(password, password_stdin)
    user = _run(
        ctx, lambda: tokendb.create_user(email=email, password=secret, name=name, role=role)
    )
    _emit(user, as_json=as_json, title="User created")


def _password(given: str | None, from_stdin: bool) -> str:
    """The password: ``--password``, the first line of stdin, or typed twice at a prompt."""
    if given is not None and from_stdin:
        _usage_error("--password and --password-stdin exclude each other")
    if given is not None:
        return given
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        _usage_error("no password: pass --password-stdin (stdin is not a terminal to prompt on)")
    typed: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    return typed


@users_app.command("get")
def users_get(
    ctx: typer.Context,
    user: Annotated[str, typer.Argument(help="The user's id or email.")],
    as_json: JsonOption = False,
) -> None:
    """Show one user.

    Example: tokendb users get ada@example.com --json
    """

    # One lookup, by whichever the argument is (the same test as _user_id's).
    lookup = {"email": user} if "@" in user else {"user_id": user}
    _emit(_run(ctx, lambda: tokendb.get_user(**lookup)), as_json=as_json)


@users_app.command("list")
def users_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option("--limit", help="Page size (1-1000).")] = 50,
    after: Annotated[
        str | None, typer.Option("--after", help="Last user id of the previous page.")
    ] = None,
    wide: WideOption = False,
    as_json: JsonOption = False,
) -> None:
    """List users, oldest first, a page at a time.

    Example: tokendb users list --limit 10
    """
    users = _run(ctx, lambda: tokendb.list_users(limit=limit, after=after))
    _emit(users, as_json=as_json, title="Users", wide=wide)


# --- keys -------------------------------------------------------------------------------


@keys_app.command("issue")
def keys_issue(
    ctx: typer.Context,
    user: UserOption,
    name: Annotated[str, typer.Option("--name", "-n", help="A label for the key.")],
    permission: Annotated[
        list[str] | None,
        typer.Option("--permission", "-p", help="A scope (repeatable); default: every scope."),
    ] = None,
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", min=1, help="Expire after this many days.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Issue an API key. Its secret is printed once: store it now.

    Example: tokendb keys issue --user ada@example.com --name laptop -p chat
    """
    expires_at = (
        None if expires_in_days is None else datetime.now(UTC) + timedelta(days=expires_in_days)
    )

    async def action() -> tuple[tokendb.ApiKey, str]:
        return await tokendb.issue_api_key(
            user=await _user_id(user), name=name, permissions=permission, expires_at=expires_at
        )

    api_key, secret = _run(ctx, action)
    if as_json:
        typer.echo(json.dumps(_jsonable(api_key) | {"secret": secret}, indent=2))
        return
    _emit(api_key, as_json=False, title="API key issued")
    out.print("Secret (shown once, store it now):")
    typer.echo(secret)


@keys_app.command("list")
def keys_list(
    ctx: typer.Context,
    user: UserOption,
    active_only: Annotated[
        bool, typer.Option("--active-only", help="Leave out revoked keys.")
    ] = False,
    wide: WideOption = False,
    as_json: JsonOption = False,
) -> None:
    """List a user's API keys (prefixes only, never secrets).

    Example: tokendb keys list --user ada@example.com --active-only
    """

    async def action() -> list[tokendb.ApiKey]:
        return await tokendb.list_api_keys(
            user=await _user_id(user), include_revoked=not active_only
        )

    _emit(_run(ctx, action), as_json=as_json, title="API keys", wide=wide)


@keys_app.command("revoke")
def keys_revoke(
    ctx: typer.Context,
    key_id: Annotated[str, typer.Argument(help="The key's id (from `keys list`).")],
    as_json: JsonOption = False,
) -> None:
    """Revoke an API key for good.

    Example: tokendb keys revoke 0190f1d2-7c4e-7b4a-9c1e-2f1e3d4c5b6a
    """
    _emit(_run(ctx, lambda: tokendb.revoke_api_key(api_key=key_id)), as_json=as_json)


@keys_app.command("verify")
def keys_verify(
    ctx: typer.Context,
    secret: Annotated[
        str | None,
        typer.Argument(help="The sk_live_… secret; read from stdin when omitted or '-'."),
    ] = None,
    permission: Annotated[
        str | None, typer.Option("--permission", "-p", help="A scope the key must grant.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Check an API key the way a gateway does; exit 1 if it is refused.

    Example: echo "$SECRET" | tokendb keys verify --permission chat
    """
    if secret is None or secret == "-":
        secret = sys.stdin.readline().strip()
    key = _run(ctx, lambda: tokendb.verify_api_key(secret=secret, permission=permission))
    _emit(key, as_json=as_json, title="Valid API key")


# --- tokens -----------------------------------------------------------------------------

AmountOption = Annotated[int, typer.Option("--amount", "-a", help="Whole tokens, at least 1.")]


def _movement(
    operation: Callable[..., Awaitable[tokendb.TokenTransaction]], summary: str, example: str
) -> Callable[..., None]:
    """A ``tokens`` command that moves tokens with ``operation`` (top_up, charge)."""

    def command(
        ctx: typer.Context,
        user: UserOption,
        amount: AmountOption,
        description: DescriptionOption = None,
        reference_id: ReferenceOption = None,
        as_json: JsonOption = False,
    ) -> None:
        async def action() -> tokendb.TokenTransaction:
            return await operation(
                user=await _user_id(user),
                amount=amount,
                description=description,
                reference_id=reference_id,
            )

        _emit(_run(ctx, action), as_json=as_json, title="Ledger row")

    command.__doc__ = f"{summary}\n\nExample: {example}"
    return command


tokens_app.command("topup")(
    _movement(
        tokendb.top_up,
        "Credit purchased tokens.",
        'tokendb tokens topup --user ada@example.com --amount 1000 -d "invoice 42"',
    )
)
tokens_app.command("charge")(
    _movement(
        tokendb.charge,
        "Debit tokens (refused, with nothing written, if the balance is too low).",
        "tokendb tokens charge --user ada@example.com --amount 40 -d completion",
    )
)


@tokens_app.command("refund")
def tokens_refund(
    ctx: typer.Context,
    transaction_id: Annotated[str, typer.Argument(help="The id of the usage row to refund.")],
    amount: Annotated[
        int | None, typer.Option("--amount", "-a", help="Default: all that is refundable.")
    ] = None,
    description: DescriptionOption = None,
    as_json: JsonOption = False,
) -> None:
    """Give back tokens of a charge (at most what was charged, across refunds).

    Example: tokendb tokens refund 0190f1d2-7c4e-7b4a-9c1e-2f1e3d4c5b6a --amount 10
    """
    tx = _run(
        ctx,
        lambda: tokendb.refund(transaction=transaction_id, amount=amount, description=description),
    )
    _emit(tx, as_json=as_json, title="Refund")


@tokens_app.command("balance")
def tokens_balance(ctx: typer.Context, user: UserOption, as_json: JsonOption = False) -> None:
    """Show a user's token balance, and what of it is available (not held).

    Example: tokendb tokens balance --user ada@example.com --json
    """

    async def action() -> tuple[str, int, int]:
        user_id = await _user_id(user)
        balance = await tokendb.get_balance(user=user_id)
        return user_id, balance, await tokendb.get_available_balance(user=user_id)

    user_id, balance, available = _run(ctx, action)
    if as_json:
        typer.echo(json.dumps({"user_id": user_id, "balance": balance, "available": available}))
    else:
        out.print(f"{balance} tokens, {available} available")


@tokens_app.command("history")
def tokens_history(
    ctx: typer.Context,
    user: UserOption,
    limit: Annotated[int, typer.Option("--limit", help="Page size (1-1000).")] = 20,
    before: Annotated[
        str | None, typer.Option("--before", help="Last transaction id of the previous page.")
    ] = None,
    wide: WideOption = False,
    as_json: JsonOption = False,
) -> None:
    """Show a user's ledger, newest first, a page at a time.

    Example: tokendb tokens history --user ada@example.com --limit 5
    """

    async def action() -> list[tokendb.TokenTransaction]:
        return await tokendb.list_transactions(
            user=await _user_id(user), limit=limit, before=before
        )

    _emit(_run(ctx, action), as_json=as_json, title="Ledger (newest first)", wide=wide)


# --- holds ------------------------------------------------------------------------------


def _day(value: str | None, default: date, option: str) -> date:
    if value is None:
        return default
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(
            f"{value!r} is not a date (YYYY-MM-DD)", param_hint=option
        ) from None


@app.command("usage")
def usage(
    ctx: typer.Context,
    user: UserOption,
    since: Annotated[
        str | None,
        typer.Option("--since", help="First UTC day, YYYY-MM-DD (default: 30 days ago)."),
    ] = None,
    until: Annotated[
        str | None,
        typer.Option("--until", help="UTC day after the last, YYYY-MM-DD (default: tomorrow)."),
    ] = None,
    by: Annotated[
        list[str] | None,
        typer.Option("--by", help="Group by day, model or api_key; repeat it (default: all)."),
    ] = None,
    api_key: Annotated[
        str | None, typer.Option("--key", help="Only this API key's usage (its id).")
    ] = None,
    model: Annotated[str | None, typer.Option("--model", help="Only this model's usage.")] = None,
    wide: WideOption = False,
    as_json: JsonOption = False,
) -> None:
    """Show a user's token usage per UTC day, model and API key (net of refunds).

    Example: tokendb usage --user ada@example.com --since 2026-11-01 --by model --json
    """
    tomorrow = datetime.now(UTC).date() + timedelta(days=1)
    first = _day(since, tomorrow - timedelta(days=31), "--since")
    end = _day(until, tomorrow, "--until")

    async def action() -> list[tokendb.UsageRow]:
        return await tokendb.usage_report(
            user=await _user_id(user),
            since=first,
            until=end,
            group_by=tuple(by) if by else GROUPINGS,
            api_key=api_key,
            model=model,
        )

    _emit(_run(ctx, action), as_json=as_json, title=f"Usage {first} to {end}", wide=wide)


@holds_app.command("list")
def holds_list(
    ctx: typer.Context,
    user: UserOption,
    status: Annotated[
        str | None,
        typer.Option(
            "--status", help="Only holds in this state: active, captured, released, expired."
        ),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", help="Page size (1-1000).")] = 20,
    before: Annotated[
        str | None, typer.Option("--before", help="Last hold id of the previous page.")
    ] = None,
    wide: WideOption = False,
    as_json: JsonOption = False,
) -> None:
    """Show a user's holds, newest first, a page at a time.

    Example: tokendb holds list --user ada@example.com --status active --json
    """

    async def action() -> list[tokendb.TokenHold]:
        return await tokendb.list_holds(
            user=await _user_id(user), status=status, limit=limit, before=before
        )

    _emit(_run(ctx, action), as_json=as_json, title="Holds (newest first)", wide=wide)


@holds_app.command("release")
def holds_release(
    ctx: typer.Context,
    hold_id: Annotated[str, typer.Argument(help="The id of the hold to release.")],
    as_json: JsonOption = False,
) -> None:
    """Give an active hold's tokens back (a released or expired hold stays as it is).

    Example: tokendb holds release 0190f1d2-7c4e-7b4a-9c1e-2f1e3d4c5b6a
    """
    _emit(_run(ctx, lambda: tokendb.release(hold=hold_id)), as_json=as_json, title="Hold")


@holds_app.command("expire")
def holds_expire(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Mark every hold past its expiry expired (optional: expiry works without it).

    Example: tokendb holds expire --json
    """
    count = _run(ctx, tokendb.expire_holds)
    if as_json:
        typer.echo(json.dumps({"expired": count}))
    else:
        out.print(f"{count} holds expired")


# --- audit ------------------------------------------------------------------------------


@app.command()
def audit(
    ctx: typer.Context,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Read the whole ledger, not the rows since the last clean audit's checkpoint.",
        ),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Check the books: balances against the ledger, chats against their billing, held
    tokens against the holds, the usage rollup against the ledger. Exit 1 if off.

    The ledger part is incremental: the rows since the last clean audit's
    checkpoint (every row the first time), and a new checkpoint when the books
    balance. --full reads the whole ledger (and stores no checkpoint). Runs
    without a statement timeout: the first or a --full audit of ten million
    rows takes longer than the default 30 s (Ctrl-C stops it).

    Example: tokendb audit --json
    Example: tokendb audit --full
    """

    async def action() -> dict[str, list[Any]]:
        ledger = await tokendb.audit_ledger(since_checkpoint=not full)
        return {
            "ledger": ledger,
            "chats": await tokendb.audit_chats(),
            "holds": await tokendb.audit_holds(),
            "usage": await tokendb.audit_usage(),
        }

    found = _run(ctx, action, statement_timeout=None)
    balanced = not any(found.values())
    if as_json:
        typer.echo(json.dumps(_jsonable(found) | {"books_balance": balanced}, indent=2))
    elif balanced:
        out.print("[green]The books balance.[/]")
    else:
        for kind, rows in found.items():
            if rows:
                _emit(rows, as_json=False, title=f"{kind} discrepancies")
    if not balanced:
        raise typer.Exit(1)


# --- db ---------------------------------------------------------------------------------


@db_app.command("start")
def db_start(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """Start the embedded server, migrate it, and keep it running until `tokendb db stop`.

    Prints the URL of its tokendb database.

    Example: tokendb db start
    """
    url = _embedded(lambda: embedded.ensure_server(config.data_dir_from_env(), keep_running=True))
    applied = _run(ctx, lambda: tokendb.migrate(url), connect=False)
    if as_json:
        typer.echo(json.dumps({"url": url, "applied": applied}))
        return
    out.print(f"The embedded server is running; {len(applied)} migration(s) applied. URL:")
    typer.echo(url)
    if config.database_url_from_env() is not None:
        err.print("Note: DATABASE_URL is set, so other commands use that database, not this one.")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server (processes using it lose their connections).

    Example: tokendb db stop
    """
    stopped = _embedded(lambda: embedded.stop_server(config.data_dir_from_env()))
    out.print("Stopped the embedded server." if stopped else "The embedded server was not running.")


@db_app.command("status")
def db_status(as_json: JsonOption = False) -> None:
    """Show whether the embedded server runs, where, and who uses it.

    Example: tokendb db status --json
    """
    status = _embedded(lambda: embedded.server_status(config.data_dir_from_env()))
    _emit(status, as_json=as_json, title="Embedded PostgreSQL")


@db_app.command("url")
def db_url() -> None:
    """Print the URL of the running embedded server's tokendb database (exit 1 if stopped).

    Example: export DATABASE_URL="$(tokendb db url)"
    """
    status = _embedded(lambda: embedded.server_status(config.data_dir_from_env()))
    if status.url is None:
        _fail("the embedded server is not running; start it with `tokendb db start`")
    typer.echo(status.url)


def main() -> None:
    """Entry point of the ``tokendb`` script: the exit codes of the module's docstring.

    Usage errors are one line naming the command's ``--help``, where click
    would print a usage block and a boxed message.
    """
    try:
        code = app(prog_name="tokendb", standalone_mode=False)
    except typer.Abort:  # Ctrl-C or EOF at a prompt
        err.print("Aborted.", highlight=False)
        sys.exit(130)
    except typer.TyperException as exc:  # click's UsageError and friends, as typer vendors them
        context = getattr(exc, "ctx", None)
        command = context.command_path if context is not None else "tokendb"
        if type(exc).__name__ == "NoArgsIsHelpError" and context is not None:
            typer.echo(context.get_help())  # `tokendb users`: the group's help, as before
            sys.exit(2)
        message = f"{exc.format_message()} (see `{command} --help`)"
        err.print(f"[bold red]Error:[/] {_escape(message)}", highlight=False, soft_wrap=True)
        sys.exit(getattr(exc, "exit_code", 2))
    sys.exit(code if isinstance(code, int) else 0)
