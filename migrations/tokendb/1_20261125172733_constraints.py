"""What the models cannot say: DB defaults, CHECKs, partial and expression indexes, triggers.

Hand-written (Aerich emits none of these). Every constraint is named, so a
violation can be told apart by ``constraint_name`` and tests can find it in
the catalog. The downgrade removes exactly what the upgrade adds; the
generated init migration below it is the floor.
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return """
-- DB defaults, so raw SQL inserts get the same values as the application.
-- gen_random_uuid() is built in since PostgreSQL 13; tokendb itself sends
-- time-ordered UUIDv7 ids.
ALTER TABLE "users"
    ALTER COLUMN "id" SET DEFAULT gen_random_uuid(),
    ALTER COLUMN "role" SET DEFAULT 'user',
    ALTER COLUMN "token_balance" SET DEFAULT 100,
    ALTER COLUMN "created_at" SET DEFAULT now(),
    ALTER COLUMN "updated_at" SET DEFAULT now();
ALTER TABLE "api_keys"
    ALTER COLUMN "id" SET DEFAULT gen_random_uuid(),
    ALTER COLUMN "permissions" SET DEFAULT '[]'::jsonb,
    ALTER COLUMN "is_active" SET DEFAULT true,
    ALTER COLUMN "created_at" SET DEFAULT now();
ALTER TABLE "token_transactions"
    ALTER COLUMN "id" SET DEFAULT gen_random_uuid(),
    ALTER COLUMN "created_at" SET DEFAULT now();
ALTER TABLE "chat_sessions"
    ALTER COLUMN "id" SET DEFAULT gen_random_uuid(),
    ALTER COLUMN "tokens_used" SET DEFAULT 0,
    ALTER COLUMN "created_at" SET DEFAULT now();
ALTER TABLE "chat_messages"
    ALTER COLUMN "id" SET DEFAULT gen_random_uuid(),
    ALTER COLUMN "created_at" SET DEFAULT now();

-- CHECKs: the backstop behind every typed error raised in Python.
ALTER TABLE "users"
    ADD CONSTRAINT "users_token_balance_nonnegative" CHECK ("token_balance" >= 0),
    ADD CONSTRAINT "users_role_valid" CHECK ("role" IN ('admin', 'user'));
ALTER TABLE "api_keys"
    ADD CONSTRAINT "api_keys_permissions_array" CHECK (jsonb_typeof("permissions") = 'array');
ALTER TABLE "token_transactions"
    ADD CONSTRAINT "token_transactions_type_valid"
        CHECK ("type" IN ('topup', 'usage', 'refund', 'bonus')),
    ADD CONSTRAINT "token_transactions_amount_nonzero" CHECK ("amount" <> 0),
    -- Debits are negative, credits positive. (An unknown type is left to
    -- token_transactions_type_valid, so each violation names one constraint.)
    ADD CONSTRAINT "token_transactions_amount_sign" CHECK (
        ("type" <> 'usage' OR "amount" < 0)
        AND ("type" NOT IN ('topup', 'refund', 'bonus') OR "amount" > 0)
    ),
    ADD CONSTRAINT "token_transactions_balance_after_nonnegative" CHECK ("balance_after" >= 0);
ALTER TABLE "chat_sessions"
    ADD CONSTRAINT "chat_sessions_tokens_used_nonnegative" CHECK ("tokens_used" >= 0);
ALTER TABLE "chat_messages"
    ADD CONSTRAINT "chat_messages_tokens_nonnegative" CHECK ("tokens" >= 0),
    ADD CONSTRAINT "chat_messages_role_valid" CHECK ("role" IN ('user', 'assistant', 'system'));

-- Email is unique case-insensitively (the application also stores it lowercased).
CREATE UNIQUE INDEX "users_email_lower_key" ON "users" (lower("email"));

-- Idempotency: one movement per (user, type, reference). Refunds are exempt:
-- their reference_id is the refunded usage row, which partial refunds share.
CREATE UNIQUE INDEX "token_transactions_idempotency_key"
    ON "token_transactions" ("user_id", "type", "reference_id")
    WHERE "reference_id" IS NOT NULL AND "type" <> 'refund';

-- Access paths (Aerich creates no index on foreign keys).
CREATE INDEX "api_keys_user_id_idx" ON "api_keys" ("user_id");
CREATE INDEX "token_transactions_user_created_idx"
    ON "token_transactions" ("user_id", "created_at" DESC, "id" DESC);
CREATE INDEX "token_transactions_refunds_idx"
    ON "token_transactions" ("reference_id") WHERE "type" = 'refund';
CREATE INDEX "chat_sessions_user_created_idx" ON "chat_sessions" ("user_id", "created_at");
CREATE INDEX "chat_messages_session_created_idx"
    ON "chat_messages" ("session_id", "created_at", "id");

-- The ledger is append-only: rows are corrected by new rows, never edited,
-- deleted or truncated. (A test harness may empty the tables with
-- SET LOCAL tokendb.allow_truncate = on; nothing else can.)
CREATE FUNCTION "tokendb_ledger_append_only"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND current_setting('tokendb.allow_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'token_transactions is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation', CONSTRAINT = 'token_transactions_append_only';
END
$$;
CREATE TRIGGER "token_transactions_append_only"
    BEFORE UPDATE OR DELETE ON "token_transactions"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_ledger_append_only"();
CREATE TRIGGER "token_transactions_no_truncate"
    BEFORE TRUNCATE ON "token_transactions"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_ledger_append_only"();

-- A balance only changes together with its ledger row: at commit, a user's
-- token_balance must equal the balance_after of their newest row. Catches a
-- stale ORM instance saved back over a charge (Model.save() writes every
-- column), and any raw UPDATE that bypasses the ledger. Deferred, because the
-- ledger row may be written after the balance within one transaction.
CREATE FUNCTION "tokendb_balance_follows_ledger"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    current_balance integer;
    last_after integer;
BEGIN
    SELECT "token_balance" INTO current_balance FROM "users" WHERE "id" = NEW."id";
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT "balance_after" INTO last_after FROM "token_transactions"
        WHERE "user_id" = NEW."id" ORDER BY "created_at" DESC, "id" DESC LIMIT 1;
    IF last_after IS DISTINCT FROM current_balance THEN
        RAISE EXCEPTION 'token_balance of user % is % but its ledger says %: '
            'balances change only through the ledger', NEW."id", current_balance, last_after
            USING ERRCODE = 'check_violation', CONSTRAINT = 'users_balance_follows_ledger';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER "users_balance_follows_ledger"
    AFTER UPDATE OF "token_balance" ON "users"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD."token_balance" IS DISTINCT FROM NEW."token_balance")
    EXECUTE FUNCTION "tokendb_balance_follows_ledger"();

-- Revocation is final, and a key never changes hands or secret.
CREATE FUNCTION "tokendb_api_key_immutable"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'API key %: revocation is final and key_hash/user_id never change', OLD."id"
        USING ERRCODE = 'check_violation', CONSTRAINT = 'api_keys_revocation_final';
END
$$;
CREATE TRIGGER "api_keys_revocation_final"
    BEFORE UPDATE ON "api_keys"
    FOR EACH ROW WHEN (
        (NOT OLD."is_active" AND NEW."is_active")
        OR OLD."key_hash" <> NEW."key_hash"
        OR OLD."user_id" <> NEW."user_id"
    )
    EXECUTE FUNCTION "tokendb_api_key_immutable"();

-- A refund must point at a usage row of the same user, and all refunds of a
-- charge together never exceed it.
CREATE FUNCTION "tokendb_refund_within_charge"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    charged integer;
    refunded bigint;
BEGIN
    -- Lock the charge first: concurrent refunds of it then add up one at a
    -- time (the sum below is read with a snapshot taken after the lock).
    SELECT -"amount" INTO charged FROM "token_transactions"
        WHERE "id" = NEW."reference_id" AND "user_id" = NEW."user_id" AND "type" = 'usage'
        FOR UPDATE;
    IF charged IS NULL THEN
        RAISE EXCEPTION 'refund % does not reference a usage row of its user', NEW."id"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_transactions_refund_target';
    END IF;
    SELECT coalesce(sum("amount"), 0) INTO refunded FROM "token_transactions"
        WHERE "reference_id" = NEW."reference_id" AND "type" = 'refund';
    IF refunded + NEW."amount" > charged THEN
        RAISE EXCEPTION 'refunds of % would exceed the charge of %', NEW."reference_id", charged
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_transactions_refund_within_charge';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER "token_transactions_refund_within_charge"
    BEFORE INSERT ON "token_transactions"
    FOR EACH ROW WHEN (NEW."type" = 'refund')
    EXECUTE FUNCTION "tokendb_refund_within_charge"();
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TRIGGER IF EXISTS "token_transactions_refund_within_charge" ON "token_transactions";
DROP FUNCTION IF EXISTS "tokendb_refund_within_charge"();
DROP TRIGGER IF EXISTS "api_keys_revocation_final" ON "api_keys";
DROP FUNCTION IF EXISTS "tokendb_api_key_immutable"();
DROP TRIGGER IF EXISTS "users_balance_follows_ledger" ON "users";
DROP FUNCTION IF EXISTS "tokendb_balance_follows_ledger"();
DROP TRIGGER IF EXISTS "token_transactions_no_truncate" ON "token_transactions";
DROP TRIGGER IF EXISTS "token_transactions_append_only" ON "token_transactions";
DROP FUNCTION IF EXISTS "tokendb_ledger_append_only"();

DROP INDEX IF EXISTS "chat_messages_session_created_idx";
DROP INDEX IF EXISTS "chat_sessions_user_created_idx";
DROP INDEX IF EXISTS "token_transactions_refunds_idx";
DROP INDEX IF EXISTS "token_transactions_user_created_idx";
DROP INDEX IF EXISTS "api_keys_user_id_idx";
DROP INDEX IF EXISTS "token_transactions_idempotency_key";
DROP INDEX IF EXISTS "users_email_lower_key";

ALTER TABLE "chat_messages"
    DROP CONSTRAINT IF EXISTS "chat_messages_role_valid",
    DROP CONSTRAINT IF EXISTS "chat_messages_tokens_nonnegative";
ALTER TABLE "chat_sessions"
    DROP CONSTRAINT IF EXISTS "chat_sessions_tokens_used_nonnegative";
ALTER TABLE "token_transactions"
    DROP CONSTRAINT IF EXISTS "token_transactions_balance_after_nonnegative",
    DROP CONSTRAINT IF EXISTS "token_transactions_amount_sign",
    DROP CONSTRAINT IF EXISTS "token_transactions_amount_nonzero",
    DROP CONSTRAINT IF EXISTS "token_transactions_type_valid";
ALTER TABLE "api_keys"
    DROP CONSTRAINT IF EXISTS "api_keys_permissions_array";
ALTER TABLE "users"
    DROP CONSTRAINT IF EXISTS "users_role_valid",
    DROP CONSTRAINT IF EXISTS "users_token_balance_nonnegative";

ALTER TABLE "chat_messages"
    ALTER COLUMN "created_at" DROP DEFAULT,
    ALTER COLUMN "id" DROP DEFAULT;
ALTER TABLE "chat_sessions"
    ALTER COLUMN "created_at" DROP DEFAULT,
    ALTER COLUMN "tokens_used" DROP DEFAULT,
    ALTER COLUMN "id" DROP DEFAULT;
ALTER TABLE "token_transactions"
    ALTER COLUMN "created_at" DROP DEFAULT,
    ALTER COLUMN "id" DROP DEFAULT;
ALTER TABLE "api_keys"
    ALTER COLUMN "created_at" DROP DEFAULT,
    ALTER COLUMN "is_active" DROP DEFAULT,
    ALTER COLUMN "permissions" DROP DEFAULT,
    ALTER COLUMN "id" DROP DEFAULT;
ALTER TABLE "users"
    ALTER COLUMN "updated_at" DROP DEFAULT,
    ALTER COLUMN "created_at" DROP DEFAULT,
    ALTER COLUMN "token_balance" DROP DEFAULT,
    ALTER COLUMN "role" DROP DEFAULT,
    ALTER COLUMN "id" DROP DEFAULT;
"""


MODELS_STATE = (
    "eJztXFFzmzgQ/isMT72ZXCZNk7T13NyMnTitr7XdsfFdr5cbRgbZ1gQERaKJp5f/fpIMBg"
    "Q4xjEJITwlXu2C+FZa9tsFfqrUuYbYnB62XfQJLtWW8lPFwIbsH3noQFGB68YGuISCqSWU"
    "gYv0a7gkQm1KqAcMyuQzYBHIRCYkhodcihzMpNi3LC50DKaI8DwS+Rh996FOnTmkC+ixgX"
    "/+ZWKETXgLSfjTvdZnCFpmYrrI5OcWcp0uXSGbTHoXl0KTn26qG47l2zjSdpd04eC1uu8j"
    "85Db8LE5xNADFJqxy+CzDK44FK1mzATU8+F6qmYkMOEM+BYHQ/1t5mODY6CE2CKTHGJ4oy"
    "Pz92CKMXVdHww1fdzVdF0tgKHhYI4/wpQD9vNuddwIGCFV+QnOP7ZHr96c/SKgcAide2JQ"
    "wKbeCUNAwcpUgB+hzXytLwBZpDE/XwAvG/O4jYQ8m3A5mIcwlQCsaoNb3YJ4Thfs5/Hp6Q"
    "ak/2yPBNhMS6DtsP2x2jiDYOh4NcZRT6LsenCGboviHFntB+lQEEEdbe3Hx/poG6iP8pE+"
    "koEWfwtAHOrXENzXR9ugy7Ry4RVjSXxd6NmIEDYxkob5j/FwkA2zZCahbSKDKv8pFiK0LN"
    "RjIXvqI4siTA75+Z4iWnOY+JFtQr5bccRf9dtfZWecfx525LDOD9CRHIOIzu7U6EfG6u84"
    "jgUBzrl/xu0kv0yZYVkOCQP840LfGQ4/J6Dv9DQJ8Em/02XbQviBKSEqxL2BJgFuAUJ1n0"
    "BTBzSN+QWDiyIbZoMu28r7ITA+DP/ZwgkBnlUJRRt8oPX63bHW7n9JOOKirXX5yLGQLiXp"
    "qzNpX6wPovzV0z4q/KfybTjoyltlrad9U/mcgE8dHTs3OjDjmITiUJTwNLx1ETvcDn5OWj"
    "ZerrKXDQ9y3HfwctJyD16uXF7BLtAcYmsZrMBn4vZgs2z0OgvCnl6MccZM9kk7q7uV72GX"
    "nMjPrjPJJYcqDe2l40E0x5/gUgDcY/MA2MhKQEJ2PQmO8zwxjaTRovTAzbr0EV9R7OJNaM"
    "FV0nHeHp+3L7qqgHgKjOsb4Jl6DtbGAlCdwLzcvBOYX34aQQuIK8nHm/ElOl4dqkawCxid"
    "YycGXwLY9JB9bMsSgMFcXBI/Nz9THLM+w4wNq1nVt/j4wcYSnPCkvVJt6nAvpA7nMY6WXb"
    "joYt9OBcoE9qFtlYsY6mTcHbUUHuqucHs87rEb90BrKYBFGX5Z9AqP/x5r3X5LIUtCoa1u"
    "l5okSh7vtyh4vM8td7yXix3sXBTijHxQg7c0JxeMTKrsjb1k+N2v2uYyxjrT+zwcfAjV5d"
    "pGEnKxjzNuXz2cA3hkIOGNcGnFpDJTbXH3+PX49cnbk3dvzk7eMRUx0bXk7QaXpKsUDavJ"
    "h7q+rCZIAwsSm6RVw202cxsS5ccPpTf1TLcPJJaTXF5FiU7puXvogLzcPeag+3L3OAtrcv"
    "f65+6rHEQU9AtnLmurx0tfjp5J7mI7LEJkc6JsRNcGtUi9k9TmdJtm7ml+L/c01cptUsOX"
    "mBqySLuTz+N2TSOryo2s4Am+gsl/0qpJ/qVg2fSJmj7RkzOoe/tEGWFgH7BGDw7XFNhk8E"
    "tgO2LxeNQ717ZrwsW7Ng/sv8V6RTVBvdz+m8b/ah7ABBg0j8inlA42snkh02mk31D6F0Lp"
    "ge34WZ2fXDYfGTR9iAwuL9BIobldezO0rTKrV7Xhl8kXtikc13ev8GTc/tDl3U4WrK7wqH"
    "s5GVy0FA+yDWJe4c5wMBm3lKmDfbJLm/Nsi1KAzECiSsCZXAiIX0nKRfmtTslsJ+88IxpY"
    "RreTLQjoQbbmC1IL2e4Bcf75eKAAW5sCi0cSHcxoFrHIDeIpuyaWNz3lQlDXt3DYVECaCs"
    "iTE/W8Csg2LL1U9ilwz2KcoUM2sEx+UQ2xfCHEEtoAFWpqrg2aN623edPaBYTcOGw/F32p"
    "PWVYZbpZJcSbV67LfeX6eT0Zvs5kihRP2hf93qClANNGmBdPwifFdymObLPC89d3anWvSs"
    "ABMSxAJVN2j0cl2Roqa7U3TPLRAkuNmaRr7uj1pGXj9ap4PeO5lHXDL8XB7uuhxr9A9YAe"
    "au2a1snI2bztWQQuuYX7ALSyWsh1gazUEkkbeshYqJlfplsNHWz+Ml2kVJk6SW76l1kmyc"
    "j5gvtldRn7XjK+/HLID+hlv0WTzx9jJjWkkKVQdL6rCiAcqNcQ3VIIeu5rwvnfQ8t/TfgR"
    "voX2NL2RvX31rEBSuf/72d3/+Gt8FA=="
)
