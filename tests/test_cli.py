"""The ``tokendb`` command, run as a user runs it: a child process on the test database.

(An in-process runner cannot be used for commands that touch the database:
Tortoise allows one global context per process, and the session's belongs
to ``tokendb_db``. Help texts need no database and use typer's runner.)
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
import typer
from typer.testing import CliRunner

import tokendb
from tests.helpers import tamper
from tokendb import schema
from tokendb.cli import app


@dataclass
class Result:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


@pytest.fixture
def cli(tokendb_clean: str) -> Any:
    """``await cli("users", "list")`` runs ``python -m tokendb`` with DATABASE_URL = the test db."""

    async def run(*args: str, stdin: str | None = None, columns: int = 200) -> Result:
        env = {**os.environ, "DATABASE_URL": tokendb_clean, "COLUMNS": str(columns)}
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tokendb",
            *args,
            env=env,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(
            process.communicate(stdin.encode() if stdin is not None else None), 120
        )
        assert process.returncode is not None
        return Result(process.returncode, out.decode(), err.decode())

    return run


def command_paths(group: Any, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = []
    for name, command in group.commands.items():
        path = (*prefix, name)
        paths.append(path)
        if hasattr(command, "commands"):  # a group (typer vendors its own click)
            paths.extend(command_paths(command, path))
    return paths


COMMANDS = command_paths(typer.main.get_group(app))


def test_every_command_is_covered_by_the_help_test() -> None:
    names = {" ".join(path) for path in COMMANDS}
    assert {
        "migrate",
        "demo",
        "audit",
        "users create",
        "users get",
        "users list",
        "keys issue",
        "keys list",
        "keys revoke",
        "keys verify",
        "tokens topup",
        "tokens charge",
        "tokens refund",
        "tokens balance",
        "tokens history",
        "holds list",
        "holds release",
        "holds expire",
        "db start",
        "db stop",
        "db status",
        "db url",
    } <= names


@pytest.mark.parametrize("path", [(), *COMMANDS], ids=lambda path: " ".join(path) or "tokendb")
def test_every_command_has_help_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "Example: " in result.output
    example = result.output.split("Example: ", 1)[1].splitlines()[0]
    assert "tokendb" in example
    words = example.split("tokendb", 1)[1].replace(")", " ").replace('"', " ").split()
    assert words[: len(path)] == list(path)


def test_read_commands_offer_json() -> None:
    readers = [
        path
        for path in COMMANDS
        if path[-1] in {"get", "list", "balance", "history", "verify", "status", "audit", "expire"}
    ]
    for path in readers:
        result = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"})
        assert "--json" in result.output, path


async def test_users_and_keys_round_trip_without_printing_hashes(cli: Any) -> None:
    created = await cli(
        "users",
        "create",
        "--email",
        "Ada@Example.com",
        "--name",
        "Ada",
        "--password",
        "correct horse battery",
        "--json",
    )
    assert created.code == 0, created.stderr
    user = created.json()
    assert user["email"] == "ada@example.com" and user["token_balance"] == 100
    assert "password_hash" not in created.stdout

    fetched = await cli("users", "get", "ada@example.com", "--json")
    assert fetched.json() == user
    assert [row["id"] for row in (await cli("users", "list", "--json")).json()] == [user["id"]]

    issued = await cli(
        "keys", "issue", "--user", "ada@example.com", "--name", "laptop", "-p", "chat", "--json"
    )
    assert issued.code == 0, issued.stderr
    key = issued.json()
    secret = key["secret"]
    assert secret.startswith("sk_live_") and key["permissions"] == ["chat"]
    assert "key_hash" not in issued.stdout

    listed = await cli("keys", "list", "--user", user["id"], "--json")
    assert [row["id"] for row in listed.json()] == [key["id"]]
    assert secret not in listed.stdout and "key_hash" not in listed.stdout

    verified = await cli("keys", "verify", "--permission", "chat", "--json", stdin=secret + "\n")
    assert verified.code == 0 and verified.json()["id"] == key["id"]
    denied = await cli("keys", "verify", secret, "--permission", "billing")
    assert denied.code == 1
    assert denied.stderr.strip() == "Error: API key lacks permission 'billing'"

    table = await cli("keys", "issue", "--user", "ada@example.com", "--name", "shown once")
    assert "Secret (shown once" in table.stdout
    assert (await cli("keys", "revoke", key["id"])).code == 0
    revoked = await cli("keys", "verify", secret)
    assert revoked.code == 1 and "was revoked" in revoked.stderr
    active = await cli("keys", "list", "--user", user["id"], "--active-only", "--json")
    assert key["id"] not in active.stdout


async def test_token_commands_move_tokens_and_refuse_overdrafts(cli: Any) -> None:
    user = await tokendb.create_user(email="bob@example.com", password="hunter2hunter2", name="Bob")
    topped = await cli(
        "tokens",
        "topup",
        "--user",
        "bob@example.com",
        "--amount",
        "400",
        "-d",
        "invoice 1",
        "--json",
    )
    assert topped.code == 0 and topped.json()["balance_after"] == 500
    charged = await cli("tokens", "charge", "-u", str(user.id), "-a", "120", "--json")
    usage = charged.json()
    assert usage["amount"] == -120 and usage["type"] == "usage"

    before = await tokendb.list_transactions(user=user)
    refused = await cli("tokens", "charge", "-u", str(user.id), "-a", "100000")
    assert refused.code == 1
    assert refused.stderr.strip() == (f"Error: user {user.id} has 380 tokens, 100000 requested")
    assert "Traceback" not in refused.stderr
    assert await tokendb.list_transactions(user=user) == before  # nothing written
    assert await tokendb.get_balance(user=user) == 380

    refunded = await cli("tokens", "refund", usage["id"], "--amount", "20", "--json")
    assert refunded.json()["amount"] == 20
    over = await cli("tokens", "refund", usage["id"], "--amount", "500")
    assert over.code == 1 and "100 refundable tokens, 500 requested" in over.stderr

    balance = await cli("tokens", "balance", "-u", "bob@example.com", "--json")
    assert balance.json() == {"user_id": str(user.id), "balance": 400, "available": 400}
    shown = await cli("tokens", "balance", "-u", "bob@example.com")
    assert shown.stdout.strip() == "400 tokens, 400 available"
    history = (await cli("tokens", "history", "-u", str(user.id), "--limit", "2", "--json")).json()
    assert [row["type"] for row in history] == ["refund", "usage"]
    older = await cli(
        "tokens", "history", "-u", str(user.id), "--before", history[-1]["id"], "--json"
    )
    assert [row["type"] for row in older.json()] == ["topup", "bonus"]


async def test_library_errors_are_one_line_and_exit_1(cli: Any) -> None:
    for args, message in [
        (("users", "get", "nobody@example.com"), "Error: user not found: nobody@example.com"),
        (("users", "get", "not-a-uuid"), "Error: user_id: not a valid UUID"),
        (("tokens", "topup", "-u", str(uuid.uuid4()), "-a", "0"), "Error: amount: must be at"),
        (("--database-url", "mysql://x/y", "users", "list"), "Error: database_url is not a usable"),
    ]:
        result = await cli(*args)
        assert result.code == 1, args
        assert result.stderr.startswith(message), result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert result.stdout == ""


async def test_audit_exits_1_when_the_books_do_not_balance(cli: Any, tokendb_clean: str) -> None:
    user = await tokendb.create_user(email="eve@example.com", password="hunter2hunter2", name="Eve")
    ok = await cli("audit")
    assert ok.code == 0 and "The books balance" in ok.stdout
    shift = "UPDATE users SET token_balance = token_balance + $2 WHERE id = $1"
    try:
        # Around the Python layer: a balance that its ledger does not explain.
        await tamper(tokendb_clean, shift, user.id, 7)
        broken = await cli("audit", "--json")
        assert broken.code == 1
        report = broken.json()
        assert report["books_balance"] is False
        assert report["ledger"][0]["user_id"] == str(user.id)
        assert report["ledger"][0]["balance"] == report["ledger"][0]["ledger_sum"] + 7
        assert (await cli("audit")).code == 1
    finally:
        await tamper(tokendb_clean, shift, user.id, -7)


async def test_audit_reads_what_came_since_its_checkpoint_and_full_reads_everything(
    cli: Any, tokendb_clean: str
) -> None:
    """An old row changed by the owner after a clean `audit`: the incremental audit
    (the default) does not read it again, `--full` does."""
    user = await tokendb.create_user(email="fay@example.com", password="hunter2hunter2", name="Fay")
    assert (await cli("audit")).code == 0  # stores a checkpoint
    [bonus] = await tokendb.list_transactions(user=user)
    change = "UPDATE token_transactions SET amount = amount + $2 WHERE id = $1"
    try:
        await tamper(tokendb_clean, change, bonus.id, 1)
        assert (await cli("audit")).code == 0
        full = await cli("audit", "--full", "--json")
        assert full.code == 1
        assert full.json()["ledger"][0]["first_broken_transaction"] == str(bonus.id)
    finally:
        await tamper(tokendb_clean, change, bonus.id, -1)
    assert (await cli("audit", "--full")).code == 0


async def test_audit_checks_the_usage_rollup_too(
    cli: Any, tokendb_clean: str, make_api_key: Any
) -> None:
    """The CLI runs every audit the suite runs after each test (it left out audit_usage)."""
    key, _ = await make_api_key()
    await tokendb.charge(user=key.user_id, amount=9, api_key=key, model="m")
    assert (await cli("audit")).code == 0
    shift = "UPDATE usage_daily SET tokens = tokens + $1"
    try:
        await tamper(tokendb_clean, shift, 1)
        broken = await cli("audit", "--json")
        assert broken.code == 1
        report = broken.json()
        assert report["books_balance"] is False
        assert report["ledger"] == report["chats"] == report["holds"] == []
        assert [(d["tokens"], d["ledger_tokens"]) for d in report["usage"]] == [(10, 9)]
    finally:
        await tamper(tokendb_clean, shift, -1)


def test_grant_sql_prints_the_statements_and_refuses_a_bad_name_in_one_line() -> None:
    runner = CliRunner()
    printed = runner.invoke(app, ["grant", "--sql", "gate way"])
    assert printed.exit_code == 0, printed.output
    assert printed.output == "".join(f"{s};\n" for s in schema.grant_sql("gate way"))
    refused = runner.invoke(app, ["grant", "--sql", "x" * 64])
    assert refused.exit_code == 1
    assert refused.output.startswith("Error: role: ") and refused.output.count("\n") == 1


async def test_grant_lets_an_existing_role_run_dml_and_refuses_a_missing_one(
    cli: Any, tokendb_clean: str
) -> None:
    role = f"tokendb_cli_{uuid.uuid4().hex[:8]}"
    missing = await cli("grant", role)
    assert missing.code == 1 and "there is no role" in missing.stderr, missing.stderr
    owner = await asyncpg.connect(tokendb_clean)
    try:
        await owner.execute(f'CREATE ROLE "{role}"')
        try:
            granted = await cli("grant", role)
            assert granted.code == 0, granted.stderr
            assert f"Granted {role}" in granted.stdout
            may = "SELECT has_table_privilege($1, $2, $3)"
            assert await owner.fetchval(may, role, "token_transactions", "INSERT")
            assert not await owner.fetchval(may, role, "usage_daily", "INSERT")
        finally:
            await owner.execute(f'DROP OWNED BY "{role}"')
            await owner.execute(f'DROP ROLE "{role}"')
    finally:
        await owner.close()


async def test_demo_seeds_users_with_a_progress_bar_and_balances_the_books(cli: Any) -> None:
    result = await cli("demo", "--users", "25")
    assert result.code == 0, result.stderr
    assert "Seeding users" in result.stderr and "25/25" in result.stderr
    assert "the books balance" in result.stdout
    assert "Balance:" in result.stdout and "Ledger (newest first)" in result.stdout
    assert len(await tokendb.list_users(limit=100)) == 26
    report = (await cli("demo", "--json")).json()
    assert report["books_balance"] is True and report["key_verified"] is True
    assert report["balance"] == 100 - 55 + 500 + 19
    assert "password_hash" not in json.dumps(report) and "key_hash" not in json.dumps(report)


async def test_migrate_reports_nothing_to_apply_on_a_migrated_database(cli: Any) -> None:
    result = await cli("migrate", "--json")
    assert result.code == 0 and result.json() == {"applied": []}
    assert (await cli("migrate")).stdout.strip() == "The schema is up to date."


# --- the command-line contract: exit codes, one-line errors, help, tables, stdin --------------


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ("users", "list", "--bogus"),
            "Error: No such option: --bogus (see `tokendb users list --help`)",
        ),
        (("users", "get"), "Error: Missing argument 'user'."),
        (("tokens", "charge", "-u", "x", "-a", "ten"), "Error: Invalid value for '--amount'"),
        (("nonsense",), "Error: No such command 'nonsense'."),
    ],
)
async def test_usage_errors_are_one_line_and_exit_2(
    cli: Any, args: tuple[str, ...], message: str
) -> None:
    result = await cli(*args)
    assert result.code == 2, result
    assert result.stderr.startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "╭" not in result.stderr and result.stdout == ""


async def test_the_password_can_come_from_stdin(cli: Any) -> None:
    created = await cli(
        "users",
        "create",
        "-e",
        "pipe@example.com",
        "-n",
        "Pipe",
        "--password-stdin",
        "--json",
        stdin="correct horse battery\n",
    )
    assert created.code == 0, created.stderr
    user = await tokendb.authenticate(email="pipe@example.com", password="correct horse battery")
    assert str(user.id) == created.json()["id"]
    # No password and no terminal to prompt on: a usage error, nothing created.
    missing = await cli("users", "create", "-e", "nopw@example.com", "-n", "No", stdin="")
    assert missing.code == 2 and "--password-stdin" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    with pytest.raises(tokendb.NotFound):
        await tokendb.get_user(email="nopw@example.com")


async def test_tables_fit_80_columns_and_wide_shows_everything(cli: Any) -> None:
    users = [
        await tokendb.create_user(
            email=f"a-rather-long-address-{n}@example.com",
            password="correct horse battery",
            name=f"Someone with a long name number {n}",
        )
        for n in range(3)
    ]
    await tokendb.issue_api_key(user=users[0], name="a key with a long name", permissions=["chat"])
    await tokendb.charge(user=users[0], amount=3, description="a long description " * 4)
    for args in [
        ("users", "list"),
        ("keys", "list", "-u", str(users[0].id)),
        ("tokens", "history", "-u", str(users[0].id)),
    ]:
        narrow = await cli(*args, columns=80)
        assert narrow.code == 0, narrow.stderr
        lines = narrow.stdout.rstrip("\n").splitlines()
        assert all(len(line) <= 80 for line in lines), narrow.stdout
        rows = [line for line in lines if "…" in line.split()[0]]  # one line a row, short ids
        assert len(rows) == (3 if args[0] == "users" else 1 if args[0] == "keys" else 2), lines
        wide = await cli(*args, "--wide", columns=80)
        assert wide.code == 0 and str(users[0].id) in wide.stdout
        assert max(len(line) for line in wide.stdout.splitlines()) > 80
    listed = (await cli("users", "list", columns=80)).stdout
    assert all("…" + user.id.hex[-8:] in listed for user in users)


def test_help_renders_text_in_brackets() -> None:
    """rich's markup must not eat `[embedded]` (nor any other bracketed text)."""
    root = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert "pip install 'tokendb[embedded]'" in root.output
    for path in COMMANDS:
        command: Any = typer.main.get_group(app)
        for name in path:
            command = command.commands[name]
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        brackets = {word for text in texts for word in re.findall(r"\w*\[[^\]\s]+\]", text)}
        output = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200"}).output
        for word in brackets:
            assert word.replace("\\", "") in output, (path, word)


async def test_a_fully_refunded_charge_says_so(cli: Any) -> None:
    user = await tokendb.create_user(email="ref@example.com", password="hunter2hunter2", name="R")
    charge = await tokendb.charge(user=user, amount=5)
    assert (await cli("tokens", "refund", str(charge.id))).code == 0
    again = await cli("tokens", "refund", str(charge.id))
    assert again.code == 1
    assert again.stderr.strip() == f"Error: transaction {charge.id} is already fully refunded"


async def test_a_missing_schema_names_tokendb_migrate(
    cli: Any, request: pytest.FixtureRequest
) -> None:
    from tokendb.testing import test_server_url, throwaway_database

    async with throwaway_database(test_server_url(request.config), prefix="tokendb_cli") as url:
        result = await cli("--database-url", url, "users", "list")
    assert result.code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "run `tokendb migrate`" in result.stderr


async def test_holds_list_release_expire_and_the_available_balance(
    cli: Any, tokendb_clean: str
) -> None:
    user = await tokendb.create_user(email="hal@example.com", password="hunter2hunter2", name="H")
    kept = await tokendb.hold(user=user, amount=30, ttl=600)
    old = await tokendb.hold(user=user, amount=20, ttl=600)
    shown = await cli("tokens", "balance", "-u", "hal@example.com")
    assert shown.stdout.strip() == "100 tokens, 50 available"
    listed = (await cli("holds", "list", "-u", "hal@example.com", "--json")).json()
    assert [(h["id"], h["status"]) for h in listed] == [
        (str(old.id), "active"),
        (str(kept.id), "active"),
    ]
    await tamper(
        tokendb_clean,
        "UPDATE token_holds SET expires_at = clock_timestamp() - interval '1 s', "
        "created_at = clock_timestamp() - interval '2 s' WHERE id = $1",
        old.id,
    )
    assert (await cli("holds", "expire", "--json")).json() == {"expired": 1}
    assert (await cli("holds", "expire")).stdout.strip() == "0 holds expired"
    released = await cli("holds", "release", str(kept.id), "--json")
    assert released.json()["status"] == "released"
    active = await cli("holds", "list", "-u", str(user.id), "--status", "active", "--json")
    assert active.json() == []
    expired = await cli("holds", "list", "-u", str(user.id), "--status", "expired")
    assert expired.code == 0 and "expired" in expired.stdout
    bad = await cli("holds", "list", "-u", str(user.id), "--status", "pending")
    assert bad.code == 1 and bad.stderr.startswith("Error: status: must be one of")
    assert (await cli("audit")).code == 0


async def test_usage_shows_a_users_usage_per_day_model_and_key(
    cli: Any, tokendb_clean: str
) -> None:
    user = await tokendb.create_user(email="uma@example.com", password="hunter2hunter2", name="U")
    key, _ = await tokendb.issue_api_key(user=user, name="k")
    await tokendb.charge(user=user, amount=7, api_key=key, model="gpt-x")
    await tokendb.charge(user=user, amount=3, model="gpt-y")
    rows = (await cli("usage", "-u", "uma@example.com", "--by", "model", "--json")).json()
    assert [(r["day"], r["model"], r["tokens"], r["requests"]) for r in rows] == [
        (None, "gpt-x", 7, 1),
        (None, "gpt-y", 3, 1),
    ]
    keyed = (await cli("usage", "-u", str(user.id), "--key", str(key.id), "--json")).json()
    today = datetime.now(UTC).date().isoformat()
    assert keyed == [
        {"day": today, "api_key_id": str(key.id), "model": "gpt-x", "tokens": 7, "requests": 1}
    ]
    table = await cli("usage", "-u", "uma@example.com")
    assert "gpt-x" in table.stdout and "gpt-y" in table.stdout
    bad = await cli("usage", "-u", "uma@example.com", "--since", "yesterday")
    assert bad.code != 0 and "--since" in bad.stderr
