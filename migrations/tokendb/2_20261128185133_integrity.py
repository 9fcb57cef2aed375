"""Integrity against every client: the database keeps the books, whatever the application sends.

Hand-written (Aerich generated only the new column and the new default).
Threat model: this migration runs as the schema's owner; the application
connects with a role that may run any DML on tokendb's tables but is neither
the owner nor a superuser (README, "Guarantees"). Under that model:

* every ledger row continues its user's chain (``seq``, ``balance_after``,
  ``(created_at, id)`` order, never dated in the future), and at commit a
  user's ``token_balance`` is the newest row's ``balance_after`` (0 without
  rows), whichever table was written first;
* every chat message continues its session's running total
  (``tokens_used_after``), is billed by exactly its usage row, and at commit
  ``tokens_used`` is the newest message's total; an ended session stays ended;
* a revoked or expired API key stays revoked or expired (keys are never
  deleted but by the owner, so a revoked key's hash stays taken);
* emails are stored trimmed, lowercase and shaped like an address;
* only the owner may edit or delete ledger rows, delete API keys or chat
  sessions, or TRUNCATE any of the five tables (the
  ``tokendb.allow_truncate`` setting, which any role could set, is gone).

``seq`` (both tables) is the row's position in its user's ledger or its
session, set by the chain triggers and unique: two writers that saw the same
predecessor (two concurrent REPEATABLE READ transactions, whose snapshots
cannot see each other's rows) cannot both commit. It is not a model field;
nothing but the database writes it.

No function may read a session's TEMP objects in place of tokendb's (a TEMP
table named ``users``, a TEMP type named ``uuid``: the application role can
create both). The three functions on every movement's path name each table
with this schema and each variable's type with ``pg_catalog`` (``@schema``
below is replaced by the schema the migration runs in); the others run with
``search_path`` pinned to this schema, then ``pg_temp``, which costs a
setting switch per call (10–20 % of a charge's statement, ``python -m
bench.triggers``). PostgreSQL never looks functions or operators up in
``pg_temp``. Each step's reverse is in :func:`downgrade`, in reverse order;
the downgrade restores migration 1's functions as they were.
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once, current_schema

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return UPGRADE.replace("@schema.", f"{await current_schema(db)}.")


UPGRADE = """
-- Functions created below keep this path (SET search_path FROM CURRENT):
-- this schema, then pg_temp explicitly last, so no TEMP table shadows ours.
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

-- Who may do what only the owner may do: the session's role and the current
-- role must both be members of the table's owner. (Referential actions such
-- as ON DELETE CASCADE run as the table's owner: current_user alone would
-- let an application role's DELETE FROM users remove API keys.)
CREATE FUNCTION "tokendb_owner_acting"(relid oid) RETURNS boolean
    LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT pg_has_role(session_user, c.relowner, 'MEMBER')
       AND pg_has_role(current_user, c.relowner, 'MEMBER')
    FROM pg_class c WHERE c.oid = relid
$$;

-- Migration 1's functions get the pinned path too (the downgrade resets it).
ALTER FUNCTION "tokendb_api_key_immutable"() SET search_path FROM CURRENT;
ALTER FUNCTION "tokendb_refund_within_charge"() SET search_path FROM CURRENT;

-- 1. Balances: 0 by default, like the model; a user without ledger rows has 0 tokens.
ALTER TABLE "users" ALTER COLUMN "token_balance" SET DEFAULT 0;

-- Raw inserts that rely on the default get the time they ran, not their
-- transaction's start (several rows of one chain in one transaction).
ALTER TABLE "token_transactions" ALTER COLUMN "created_at" SET DEFAULT clock_timestamp();
ALTER TABLE "chat_messages" ALTER COLUMN "created_at" SET DEFAULT clock_timestamp();

-- 2. The ledger's chain position. Existing rows are numbered in chain order.
ALTER TABLE "token_transactions" ADD COLUMN "seq" integer;
ALTER TABLE "token_transactions" DISABLE TRIGGER "token_transactions_append_only";
UPDATE "token_transactions" t SET "seq" = n.seq
FROM (
    SELECT id, row_number() OVER (PARTITION BY user_id ORDER BY created_at, id) AS seq
    FROM "token_transactions"
) AS n
WHERE n.id = t.id;
ALTER TABLE "token_transactions" ENABLE TRIGGER "token_transactions_append_only";
ALTER TABLE "token_transactions" ALTER COLUMN "seq" SET NOT NULL;
CREATE UNIQUE INDEX "token_transactions_user_seq_key" ON "token_transactions" ("user_id", "seq");
COMMENT ON COLUMN "token_transactions"."seq" IS
    'position in the user''s ledger (1, 2, ...); set by the database (token_transactions_chain)';

-- Each chained row continues the newest row of its chain: a ledger row its
-- user's, a chat message its session's (which must be open; its row is
-- locked, so ending the session waits for the message). It gets seq + 1;
-- its running total (balance_after, tokens_used_after) must be the
-- previous one's + its own amount (tokens); and it is dated by the database:
-- never after it is written (a date in the future becomes now) and after the
-- previous row in (created_at, id) (an earlier one becomes 1 microsecond
-- after it). So the chain's order is (created_at, id) whatever a writer
-- sends, a row dated in 2999 cannot freeze its chain, and a client whose
-- clock runs ahead or behind the server's is not refused.
-- A multi-row INSERT sees its own earlier rows here (a BEFORE ROW trigger
-- sees the rows its statement already inserted), so a batch is inserted in
-- chain order. Writers of one chain take turns on the user's (session's)
-- row: tokendb's statements hold that lock already (their UPDATE of it); a
-- writer that did not is refused by the unique seq index rather than
-- forking the chain.
CREATE FUNCTION "tokendb_chain"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    ended pg_catalog.timestamptz;
    prev_seq pg_catalog.int4;
    prev_after pg_catalog.int4;
    prev_at pg_catalog.timestamptz;
    prev_id pg_catalog.uuid;
    total pg_catalog.int4;
    step pg_catalog.int4;
    dated pg_catalog.timestamptz := least(NEW."created_at", clock_timestamp());
BEGIN
    IF TG_TABLE_NAME = 'token_transactions' THEN
        SELECT "seq", "balance_after", "created_at", "id" INTO prev_seq, prev_after, prev_at, prev_id
        FROM @schema."token_transactions" WHERE "user_id" = NEW."user_id"
        ORDER BY "seq" DESC LIMIT 1;
        total := NEW."balance_after";
        step := NEW."amount";
    ELSE
        SELECT "ended_at" INTO ended FROM @schema."chat_sessions"
            WHERE "id" = NEW."session_id" FOR NO KEY UPDATE;
        IF NOT FOUND THEN
            RETURN NEW;  -- chat_messages_session_id_fkey refuses it
        END IF;
        IF ended IS NOT NULL THEN
            RAISE EXCEPTION 'chat session % has ended', NEW."session_id"
                USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_messages_session_open';
        END IF;
        SELECT "seq", "tokens_used_after", "created_at", "id"
            INTO prev_seq, prev_after, prev_at, prev_id
        FROM @schema."chat_messages" WHERE "session_id" = NEW."session_id"
        ORDER BY "seq" DESC LIMIT 1;
        total := NEW."tokens_used_after";
        step := NEW."tokens";
    END IF;
    NEW."seq" := coalesce(prev_seq, 0) + 1;
    IF prev_seq IS NOT NULL AND (dated, NEW."id") <= (prev_at, prev_id) THEN
        dated := prev_at + interval '1 microsecond';
        IF dated > clock_timestamp() THEN  -- only if the previous row is dated in the future
            RAISE EXCEPTION 'the previous row of this chain is dated in the future (%)', prev_at
                USING ERRCODE = 'check_violation', CONSTRAINT = TG_TABLE_NAME || '_order';
        END IF;
    END IF;
    NEW."created_at" := dated;
    IF total IS DISTINCT FROM coalesce(prev_after, 0) + step THEN
        RAISE EXCEPTION '% % does not continue its chain: % + % = %',
            CASE TG_TABLE_NAME WHEN 'chat_messages' THEN 'tokens_used_after' ELSE 'balance_after' END,
            total, coalesce(prev_after, 0), step, coalesce(prev_after, 0) + step
            USING ERRCODE = 'check_violation', CONSTRAINT = TG_TABLE_NAME || '_chain';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER "token_transactions_chain"
    BEFORE INSERT ON "token_transactions"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_chain"();

-- 3. Balances follow the ledger. At commit, for a user inserted or whose
-- balance changed (a balance no row gave): token_balance = the newest row's
-- balance_after (0 without rows). At the end of every statement that
-- inserts ledger rows, for each of their users, the same: a ledger row
-- comes with its balance (in the same statement, as tokendb writes them, or
-- after the balance was set), never before it. One check a statement, not
-- one a row: a coalesced batch of 64 charges pays it once. The same
-- statement check holds a usage row that references a message of its user
-- to that message's tokens (the other side is chat_messages_billed).
CREATE OR REPLACE FUNCTION "tokendb_balance_follows_ledger"() RETURNS trigger
    LANGUAGE plpgsql AS $$
DECLARE
    current_balance pg_catalog.int4;
    last_after pg_catalog.int4;
BEGIN
    SELECT "token_balance" INTO current_balance FROM @schema."users" WHERE "id" = NEW."id";
    IF NOT FOUND THEN
        RETURN NULL;
    END IF;
    SELECT "balance_after" INTO last_after FROM @schema."token_transactions"
        WHERE "user_id" = NEW."id" ORDER BY "seq" DESC LIMIT 1;
    IF coalesce(last_after, 0) <> current_balance THEN
        RAISE EXCEPTION 'token_balance of user % is % but its ledger says %: '
            'balances change only through the ledger', NEW."id", current_balance,
            coalesce(last_after, 0)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'users_balance_follows_ledger';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER "users_balance_follows_ledger_on_insert"
    AFTER INSERT ON "users"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION "tokendb_balance_follows_ledger"();

CREATE FUNCTION "tokendb_ledger_books"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owner_id pg_catalog.uuid;
    current_balance pg_catalog.int4;
    last_after pg_catalog.int4;
    row_id pg_catalog.uuid;
    message_id pg_catalog.uuid;
    billed pg_catalog.int4;
    message_tokens pg_catalog.int4;
BEGIN
    -- "inserted" is the statement's new rows (a transition table: no TEMP
    -- table can stand in for it). Only the scans of it are planned on each
    -- call; the lookups in the loops are planned once a session.
    FOR owner_id IN SELECT DISTINCT "user_id" FROM inserted LOOP
        SELECT "balance_after" INTO last_after FROM @schema."token_transactions"
            WHERE "user_id" = owner_id ORDER BY "seq" DESC LIMIT 1;
        SELECT "token_balance" INTO current_balance FROM @schema."users" WHERE "id" = owner_id;
        IF current_balance IS DISTINCT FROM last_after THEN
            RAISE EXCEPTION 'token_balance of user % is % but its ledger says %: '
                'a ledger row comes with its balance', owner_id, current_balance, last_after
                USING ERRCODE = 'check_violation', CONSTRAINT = 'users_balance_follows_ledger';
        END IF;
    END LOOP;
    FOR row_id, owner_id, message_id, billed IN
        SELECT "id", "user_id", "reference_id", -"amount" FROM inserted
        WHERE "type" = 'usage' AND "reference_id" IS NOT NULL
    LOOP
        SELECT m."tokens" INTO message_tokens
        FROM @schema."chat_messages" m JOIN @schema."chat_sessions" s ON s."id" = m."session_id"
        WHERE m."id" = message_id AND s."user_id" = owner_id;
        IF FOUND AND billed <> message_tokens THEN
            RAISE EXCEPTION 'usage row % bills % tokens for message % of % tokens',
                row_id, billed, message_id, message_tokens
                USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_messages_billed';
        END IF;
    END LOOP;
    RETURN NULL;
END
$$;
CREATE TRIGGER "token_transactions_books"
    AFTER INSERT ON "token_transactions"
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_ledger_books"();

-- 4. Append-only for every role but the owner; no escape hatch in a setting.
CREATE OR REPLACE FUNCTION "tokendb_ledger_append_only"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF tokendb_owner_acting(TG_RELID) THEN
        RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    RAISE EXCEPTION 'token_transactions is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation', CONSTRAINT = 'token_transactions_append_only';
END
$$;

-- TRUNCATE of the other four tables: the owner's alone too (the ledger's
-- is token_transactions_no_truncate, above).
CREATE FUNCTION "tokendb_refuse_truncate"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF NOT tokendb_owner_acting(TG_RELID) THEN
        RAISE EXCEPTION 'TRUNCATE % refused: only the schema owner may empty tokendb''s tables',
            TG_TABLE_NAME
            USING ERRCODE = 'restrict_violation', CONSTRAINT = TG_TABLE_NAME || '_no_truncate';
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER "users_no_truncate" BEFORE TRUNCATE ON "users"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_refuse_truncate"();
CREATE TRIGGER "api_keys_no_truncate" BEFORE TRUNCATE ON "api_keys"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_refuse_truncate"();
CREATE TRIGGER "chat_sessions_no_truncate" BEFORE TRUNCATE ON "chat_sessions"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_refuse_truncate"();
CREATE TRIGGER "chat_messages_no_truncate" BEFORE TRUNCATE ON "chat_messages"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_refuse_truncate"();

-- 5. API keys: never deleted but by the owner, so the unique key_hash keeps
-- a revoked key's hash taken for good (ON DELETE CASCADE from users runs as
-- the table's owner: tokendb_owner_acting also asks for the session's role);
-- an expired key's expiry is final (an unexpired key may still be extended
-- or shortened).
CREATE FUNCTION "tokendb_kept"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF tokendb_owner_acting(TG_RELID) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION '% %: only the schema owner deletes these rows (revoke a key, end a session)',
        TG_TABLE_NAME, OLD."id"
        USING ERRCODE = 'restrict_violation', CONSTRAINT = TG_TABLE_NAME || '_kept';
END
$$;
CREATE TRIGGER "api_keys_kept"
    BEFORE DELETE ON "api_keys"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_kept"();

CREATE FUNCTION "tokendb_api_key_expiry_final"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF OLD."expires_at" <= clock_timestamp() THEN
        RAISE EXCEPTION 'API key % expired at %: its expiry is final', OLD."id", OLD."expires_at"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'api_keys_expiry_final';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER "api_keys_expiry_final"
    BEFORE UPDATE ON "api_keys"
    FOR EACH ROW WHEN (OLD."expires_at" IS NOT NULL AND NEW."expires_at" IS DISTINCT FROM OLD."expires_at")
    EXECUTE FUNCTION "tokendb_api_key_expiry_final"();

-- 6. Emails as tokendb stores them: trimmed, lowercase, shaped like an
-- address. (lower() follows the database's locale; under the C locale it
-- folds ASCII only, and tokendb's own Python normalisation is stricter.)
ALTER TABLE "users"
    ADD CONSTRAINT "users_email_normalised" CHECK ("email" = lower(btrim("email"))),
    ADD CONSTRAINT "users_email_shape"
        CHECK ("email" ~ '^[^@[:space:]]+@[^@[:space:]]+\\.[^@[:space:]]+$');

-- 7. Chat messages: the running total, and the position in the session.
ALTER TABLE "chat_messages" ADD COLUMN "tokens_used_after" integer;
ALTER TABLE "chat_messages" ADD COLUMN "seq" integer;
UPDATE "chat_messages" m SET "tokens_used_after" = n.after, "seq" = n.seq
FROM (
    SELECT id, sum(tokens) OVER w AS after, row_number() OVER w AS seq
    FROM "chat_messages"
    WINDOW w AS (PARTITION BY session_id ORDER BY created_at, id)
) AS n
WHERE n.id = m.id;
ALTER TABLE "chat_messages"
    ALTER COLUMN "tokens_used_after" SET NOT NULL,
    ALTER COLUMN "seq" SET NOT NULL;
CREATE UNIQUE INDEX "chat_messages_session_seq_key" ON "chat_messages" ("session_id", "seq");
COMMENT ON COLUMN "chat_messages"."seq" IS
    'position in the session (1, 2, ...); set by the database (chat_messages_chain)';

-- A message continues its session's chain (tokendb_chain, above).
CREATE TRIGGER "chat_messages_chain"
    BEFORE INSERT ON "chat_messages"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_chain"();

-- What a message says is final, except its text and role (which a host may
-- redact): the billed numbers, the session, the order.
CREATE FUNCTION "tokendb_message_immutable"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION 'chat message %: id, session, tokens, totals and created_at never change', OLD."id"
        USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_messages_immutable';
END
$$;
CREATE TRIGGER "chat_messages_immutable"
    BEFORE UPDATE ON "chat_messages"
    FOR EACH ROW WHEN (
        NEW."id" <> OLD."id" OR NEW."session_id" <> OLD."session_id"
        OR NEW."tokens" <> OLD."tokens" OR NEW."tokens_used_after" <> OLD."tokens_used_after"
        OR NEW."seq" <> OLD."seq" OR NEW."created_at" <> OLD."created_at"
    )
    EXECUTE FUNCTION "tokendb_message_immutable"();

-- A message leaves only with its session (ON DELETE CASCADE, the owner's to
-- run): deleting it while the session stays would break the session's
-- total. Checked at commit, for every role.
CREATE FUNCTION "tokendb_message_kept"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM "chat_sessions" WHERE "id" = OLD."session_id") THEN
        RAISE EXCEPTION 'chat message %: messages are deleted only with their session', OLD."id"
            USING ERRCODE = 'restrict_violation', CONSTRAINT = 'chat_messages_kept';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER "chat_messages_kept"
    AFTER DELETE ON "chat_messages"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION "tokendb_message_kept"();

-- 8. Chat sessions: opened on an active, unexpired key of their own user;
-- their user, key, id and start never change, and an ended session stays
-- ended. They are never deleted but by the owner (with their messages), so
-- an ended session cannot come back under its id.
CREATE TRIGGER "chat_sessions_kept"
    BEFORE DELETE ON "chat_sessions"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_kept"();

CREATE FUNCTION "tokendb_session_key"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    key record;
BEGIN
    SELECT "user_id", "is_active", "expires_at" INTO key FROM "api_keys" WHERE "id" = NEW."api_key_id";
    IF NOT FOUND THEN
        RETURN NEW;  -- chat_sessions_api_key_id_fkey refuses it
    END IF;
    IF key."user_id" <> NEW."user_id" THEN
        RAISE EXCEPTION 'chat session %: API key % belongs to another user', NEW."id", NEW."api_key_id"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_sessions_key_owner';
    END IF;
    IF NOT key."is_active" OR key."expires_at" <= now() THEN
        RAISE EXCEPTION 'chat session %: API key % is revoked or expired', NEW."id", NEW."api_key_id"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_sessions_key_valid';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER "chat_sessions_key"
    BEFORE INSERT ON "chat_sessions"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_session_key"();

CREATE FUNCTION "tokendb_session_immutable"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF OLD."ended_at" IS NOT NULL AND NEW."ended_at" IS DISTINCT FROM OLD."ended_at" THEN
        RAISE EXCEPTION 'chat session % ended at %: that is final', OLD."id", OLD."ended_at"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_sessions_ended_final';
    END IF;
    RAISE EXCEPTION 'chat session %: id, user, API key and created_at never change', OLD."id"
        USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_sessions_immutable';
END
$$;
CREATE TRIGGER "chat_sessions_immutable"
    BEFORE UPDATE ON "chat_sessions"
    FOR EACH ROW WHEN (
        NEW."id" <> OLD."id" OR NEW."user_id" <> OLD."user_id"
        OR NEW."api_key_id" <> OLD."api_key_id" OR NEW."created_at" <> OLD."created_at"
        OR (OLD."ended_at" IS NOT NULL AND NEW."ended_at" IS DISTINCT FROM OLD."ended_at")
    )
    EXECUTE FUNCTION "tokendb_session_immutable"();

-- 9. The chat books, at commit. For a session (inserted, or its tokens_used
-- changed) and for a new message: tokens_used is the newest message's
-- tokens_used_after (0 without messages). For a new message also: it is
-- billed by exactly its usage row (the session's user, type usage,
-- reference_id = the message's id, amount = -tokens), and only when
-- tokens > 0 (a usage row written later for a message is checked by
-- token_transactions_books). The idempotency index allows one such row per
-- message.
CREATE FUNCTION "tokendb_chat_books"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    target_id pg_catalog.uuid;
    owner_id pg_catalog.uuid;
    session_total pg_catalog.int4;
    last_after pg_catalog.int4;
    message_tokens pg_catalog.int4;
    billed pg_catalog.int4;
BEGIN
    IF TG_TABLE_NAME = 'chat_sessions' THEN
        target_id := NEW."id";
    ELSE
        target_id := NEW."session_id";
    END IF;
    SELECT "user_id", "tokens_used" INTO owner_id, session_total FROM @schema."chat_sessions"
        WHERE "id" = target_id;
    IF NOT FOUND THEN
        RETURN NULL;  -- deleted later in the transaction (by the owner)
    END IF;
    SELECT "tokens_used_after" INTO last_after FROM @schema."chat_messages"
        WHERE "session_id" = target_id ORDER BY "seq" DESC LIMIT 1;
    IF coalesce(last_after, 0) <> session_total THEN
        RAISE EXCEPTION 'tokens_used of chat session % is % but its messages say %',
            target_id, session_total, coalesce(last_after, 0)
            USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_sessions_tokens_follow_messages';
    END IF;
    IF TG_TABLE_NAME = 'chat_messages' THEN
        SELECT "tokens" INTO message_tokens FROM @schema."chat_messages" WHERE "id" = NEW."id";
        IF NOT FOUND THEN
            RETURN NULL;
        END IF;
        -- A usage row for this message written by a concurrent transaction
        -- holds a key-share lock on the user (its foreign key's check) until
        -- it commits: wait for it, so that one of the two sees the other.
        PERFORM FROM @schema."users" WHERE "id" = owner_id FOR UPDATE;
        SELECT -"amount" INTO billed FROM @schema."token_transactions"
            WHERE "user_id" = owner_id AND "type" = 'usage' AND "reference_id" = NEW."id";
        IF coalesce(billed, 0) <> message_tokens THEN
            RAISE EXCEPTION 'chat message % of % tokens is billed %', NEW."id", message_tokens,
                coalesce(billed, 0)
                USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_messages_billed';
        END IF;
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER "chat_sessions_tokens_follow_messages_on_insert"
    AFTER INSERT ON "chat_sessions"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION "tokendb_chat_books"();
CREATE CONSTRAINT TRIGGER "chat_sessions_tokens_follow_messages"
    AFTER UPDATE OF "tokens_used" ON "chat_sessions"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (OLD."tokens_used" IS DISTINCT FROM NEW."tokens_used")
    EXECUTE FUNCTION "tokendb_chat_books"();
CREATE CONSTRAINT TRIGGER "chat_messages_billed"
    AFTER INSERT ON "chat_messages"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION "tokendb_chat_books"();
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TRIGGER IF EXISTS "chat_messages_billed" ON "chat_messages";
DROP TRIGGER IF EXISTS "chat_sessions_tokens_follow_messages" ON "chat_sessions";
DROP TRIGGER IF EXISTS "chat_sessions_tokens_follow_messages_on_insert" ON "chat_sessions";
DROP FUNCTION IF EXISTS "tokendb_chat_books"();

DROP TRIGGER IF EXISTS "chat_sessions_kept" ON "chat_sessions";
DROP TRIGGER IF EXISTS "chat_sessions_immutable" ON "chat_sessions";
DROP FUNCTION IF EXISTS "tokendb_session_immutable"();
DROP TRIGGER IF EXISTS "chat_sessions_key" ON "chat_sessions";
DROP FUNCTION IF EXISTS "tokendb_session_key"();

DROP TRIGGER IF EXISTS "chat_messages_kept" ON "chat_messages";
DROP FUNCTION IF EXISTS "tokendb_message_kept"();
DROP TRIGGER IF EXISTS "chat_messages_immutable" ON "chat_messages";
DROP FUNCTION IF EXISTS "tokendb_message_immutable"();
DROP TRIGGER IF EXISTS "chat_messages_chain" ON "chat_messages";
DROP INDEX IF EXISTS "chat_messages_session_seq_key";
ALTER TABLE "chat_messages" DROP COLUMN IF EXISTS "seq";
ALTER TABLE "chat_messages" DROP COLUMN IF EXISTS "tokens_used_after";

ALTER TABLE "users"
    DROP CONSTRAINT IF EXISTS "users_email_shape",
    DROP CONSTRAINT IF EXISTS "users_email_normalised";

DROP TRIGGER IF EXISTS "api_keys_expiry_final" ON "api_keys";
DROP FUNCTION IF EXISTS "tokendb_api_key_expiry_final"();
DROP TRIGGER IF EXISTS "api_keys_kept" ON "api_keys";
DROP FUNCTION IF EXISTS "tokendb_kept"();

DROP TRIGGER IF EXISTS "chat_messages_no_truncate" ON "chat_messages";
DROP TRIGGER IF EXISTS "chat_sessions_no_truncate" ON "chat_sessions";
DROP TRIGGER IF EXISTS "api_keys_no_truncate" ON "api_keys";
DROP TRIGGER IF EXISTS "users_no_truncate" ON "users";
DROP FUNCTION IF EXISTS "tokendb_refuse_truncate"();

-- Migration 1's append-only function and balance check, as they were.
CREATE OR REPLACE FUNCTION "tokendb_ledger_append_only"() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' AND current_setting('tokendb.allow_truncate', true) = 'on' THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'token_transactions is append-only: % refused', TG_OP
        USING ERRCODE = 'restrict_violation', CONSTRAINT = 'token_transactions_append_only';
END
$$;

DROP TRIGGER IF EXISTS "token_transactions_books" ON "token_transactions";
DROP FUNCTION IF EXISTS "tokendb_ledger_books"();
DROP TRIGGER IF EXISTS "users_balance_follows_ledger_on_insert" ON "users";
CREATE OR REPLACE FUNCTION "tokendb_balance_follows_ledger"() RETURNS trigger LANGUAGE plpgsql AS $$
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

DROP TRIGGER IF EXISTS "token_transactions_chain" ON "token_transactions";
DROP FUNCTION IF EXISTS "tokendb_chain"();
DROP INDEX IF EXISTS "token_transactions_user_seq_key";
ALTER TABLE "token_transactions" DROP COLUMN IF EXISTS "seq";

ALTER TABLE "chat_messages" ALTER COLUMN "created_at" SET DEFAULT now();
ALTER TABLE "token_transactions" ALTER COLUMN "created_at" SET DEFAULT now();
ALTER TABLE "users" ALTER COLUMN "token_balance" SET DEFAULT 100;

ALTER FUNCTION "tokendb_refund_within_charge"() RESET search_path;
ALTER FUNCTION "tokendb_api_key_immutable"() RESET search_path;
DROP FUNCTION IF EXISTS "tokendb_owner_acting"(oid);
"""


MODELS_STATE = (
    "eJztnO9vmzgYx/8VxKud1Ku6ru226HRS0qZbbksyJeRut+sJOeAkVsEwbNZGu/7vZzsQwE"
    "Aa0tBSyqs2th9+fB5snu/zAD9V6lxDbE4P2y76BJdqS/mpYmBD9o/cdaCowHVjHbyFgqkl"
    "BgMX6ddwScSwKaEeMChrnwGLQNZkQmJ4yKXIwawV+5bFGx2DDUR4HjX5GH33oU6dOaQL6L"
    "GOf/5lzQib8BaS8Kd7rc8QtMzE4SKT71u063TpirbJpHdxKUby3U11w7F8G0ej3SVdOHg9"
    "3PeRechteN8cYugBCs3YafCjDM44bFodMWugng/Xh2pGDSacAd/iMNTfZj42OAMlZItMco"
    "jhjY7M34NDjA3X9cFQ08ddTdfVAgwNB3P+CFMO7OfdarsRGNGq8h2cf2yPXr05+0WgcAid"
    "e6JTYFPvhCGgYGUq4Ee0ma/1BSCLNPPzBfCymcdtJPLsgMthHmIqAaxqg1vdgnhOF+zn8e"
    "npBtJ/tkcCNhslaDtsfqwmziDoOl71cepJyq4HZ+i2KOfIaj+kw4YIdTS1H5/10Taoj/JJ"
    "H8mgxd8CiMPxNYT7+mgbumxULl7Rl+TrQs9GhLADI2nMf4yHg2zMkplE20QGVf5TLERoWd"
    "RjS/bURxZFmBzy/T3Fas0x8S3bhHy34sRf9dtfZWecfx525GWdb6AjOQYRnd2p0Y+Mq7/j"
    "OBYEOOf+GbeT/DJlhmU5JFzgHxd9Zzj8nEDf6WkS8Em/02XTQviBDUJUNPcGmgTcAoTqPo"
    "GmDmia+QXDRZENs6HLtvJ8CIwPw3+2cELAsypL0QYfaL1+d6y1+18Sjrhoa13ecyxal1Lr"
    "qzNpXqw3ovzV0z4q/KfybTjoylNlPU77pvJjAj51dOzc6MCMMwmbw6aEp+Gti9jmdvBz0r"
    "LxcpW9bHiQc9/By0nLPXi5cnEFO0FziK1lcAU+E7cHk2Wj19ki7OnFFGfMZJ+ys7pT+R51"
    "yYX87DpTXHJUabSXjgfRHH+CSwG4x44DYCMrAAnV9STYzvNkGrVGF6UHbtapj/gVxU7ehB"
    "ZcBR3n7fF5+6KrCsRTYFzfAM/Uc1gbC0B1AvNi805gfvlpBC0gziSfN9NLdLzaVI2wC4zO"
    "sRPDlwCb7rKPbbkFYDAXp8T3zfcUZ9ZnzFi3mpV9i/cfbEzBCU/aq6FNHu6F5OE8ptGyEx"
    "dd7NuphTLBPrStchJDnYy7o5bCl7or3B6Pe+zGPdBaCmCrDD8teoXHf4+1br+lkCWh0Fa3"
    "C00SKY/3WyQ83uemO97LyQ62LwpxRjyowVuaEwtGJlX2xl4i/O5XbXMaYx3pfR4OPoTD5d"
    "xGErmYxxm3rx7OAR4ZSLwRLi2ZVGaoLe4evx6/Pnl78u7N2ck7NkQc6Lrl7QaXpLMUKzxB"
    "rmFGs8Kxe9BKtg3lDMqNdsxHXV/tGATbBeVj0qpRkJsVJIlUyENFZD1FzYGkJZOXV1E5Wb"
    "pCCh2Qp5BiDrpPIcW1bqOQ6q+QYuHIbkHM44YvR88kdrEdtkJkK89somuDWgicpIA83aZk"
    "fppfMT9NFcyb0PAlhoZspd3J53G7plxY5XJh8JxkweA/adUE/9Ji2VTjmmrckyuoe6txGc"
    "vAPrBGj2fXFGxy8UuwHbH1eNQ717YrdcZrYw+scsYqcjWhXm6VU+N/NQ9gAgyaJ+RTgw42"
    "qnnRptNofCPpX4ikB7bjZ9XXctV8ZNDUIbKqPZxGiuZ2ReTQtsqqXtWGXyZf2KRwXN+9wp"
    "Nx+0OX15TZYnWFR93LyeCipXiQTRDzCneGg8m4pUwd7JNdislnW6QCZAUSZQLO5ERA/ExS"
    "LsovKEtmO3nnGcnAMmrK7IKAHmTXfEFpIds9YJ1/Ph4ooNamwOIrSeG6csquWcubmnIh1P"
    "VNHDYZkCYD8uRCPS8Dso1KL1V9Cu5ZijN0yAaVyU+qEZYvRFhCG6BCRc21QfM++zbvs7uA"
    "kBuHzeeinw5IGVZZblaJePNie7kvtj+v5+/XkUyR5En7ot8btBRg2gjz5En4PP4uyZFtrv"
    "D86zt1da9SwIEwLCAlU3bN8z2Njmx0JEPsmjt6PWnZeL0qXs94KmVd7kspsPsqqPGvfD2g"
    "glq7knVy5WzeqC2CSy7gPoBWVgG5LshKTZC0oYeMhZr59b9V18Hmr/9FgyqTJckN/jKTJB"
    "kRX3C/rK5e30vEl58M+QG97Hdo8tVjzKSGArIUgc5nVQHCwfAa0i1Fnue+ip3/zbn8V7Ef"
    "4XtzT1MZ2duX5QoElfu/n939D7ke7hc="
)
