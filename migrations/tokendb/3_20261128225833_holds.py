"""Token holds: tokens reserved for a completion, captured, released or expired.

Aerich generated the table and ``users.held_tokens``; the rest is written by
hand, in the spirit of migration 2 (same threat model: the application role
may send any DML on tokendb's tables, and every committed state keeps the
rules below).

``users.held_tokens`` is Σ ``amount`` of the user's holds whose status is
``active`` (an expired hold nobody marked yet included): what can be spent
is ``token_balance - held_tokens``. The cache is what makes one conditional
``UPDATE users`` decide a debit or a hold under the user's row lock (a
``SUM`` over the holds in the same ``WHERE`` would be read from the
statement's snapshot, taken before the lock wait: a hold committed meanwhile
would be missed). It only ever over-counts (expired holds not yet marked),
so a debit decided on it can be refused wrongly, never granted wrongly;
tokendb then marks the user's expired holds and decides again
(``tokendb._holds_sql``).

* ``held_tokens`` is never negative nor above ``token_balance`` (CHECKs):
  held tokens cannot be spent, by any statement.
* At commit, for every user whose ``held_tokens`` changed or whose holds
  were written, ``held_tokens`` = Σ active holds (``users_held_tokens_follow_holds``,
  ``token_holds_books``); a captured hold names a usage row of its user for
  exactly its captured amount.
* A hold is born ``active`` (dated by the database, ``ttl <= 24 h``)
  and moves once, to ``captured`` (before ``expires_at``, with its
  transaction), ``released`` or ``expired`` (only after ``expires_at``);
  ``resolved_at`` is the database's clock. Its user, amount, reference,
  description and dates never change, and holds are deleted by the owner
  only (``token_holds_kept``), nor truncated (``token_holds_no_truncate``).
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once, current_schema

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return UPGRADE.replace("@schema.", f"{await current_schema(db)}.")


UPGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE TABLE IF NOT EXISTS "token_holds" (
    "id" UUID NOT NULL PRIMARY KEY,
    "amount" INT NOT NULL,
    "status" VARCHAR(8) NOT NULL,
    "reference_id" UUID,
    "description" TEXT,
    "expires_at" TIMESTAMPTZ NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "resolved_at" TIMESTAMPTZ,
    "captured_amount" INT,
    "captured_transaction_id" UUID REFERENCES "token_transactions" ("id") ON DELETE RESTRICT,
    "user_id" UUID NOT NULL REFERENCES "users" ("id") ON DELETE RESTRICT
);
COMMENT ON COLUMN "token_holds"."status" IS 'ACTIVE: active\nCAPTURED: captured\nRELEASED: released\nEXPIRED: expired';
COMMENT ON TABLE "token_holds" IS 'Tokens reserved for a completion whose cost is not known yet (:mod:`tokendb.holds`).';
ALTER TABLE "users" ADD "held_tokens" INT NOT NULL DEFAULT 0;

-- 1. The shape of a hold, and of the cache.
ALTER TABLE "token_holds"
    ALTER COLUMN "id" SET DEFAULT gen_random_uuid(),
    ALTER COLUMN "status" SET DEFAULT 'active',
    ALTER COLUMN "created_at" SET DEFAULT clock_timestamp(),
    ADD CONSTRAINT "token_holds_amount_positive" CHECK ("amount" > 0),
    ADD CONSTRAINT "token_holds_status_valid"
        CHECK ("status" IN ('active', 'captured', 'released', 'expired')),
    ADD CONSTRAINT "token_holds_ttl" CHECK ("expires_at" <= "created_at" + interval '24 hours'),
    ADD CONSTRAINT "token_holds_captured"
        CHECK (("status" = 'captured') = ("captured_transaction_id" IS NOT NULL)
           AND ("status" = 'captured') = ("captured_amount" IS NOT NULL)
           AND ("captured_amount" IS NULL OR "captured_amount" BETWEEN 1 AND "amount")
           AND ("status" = 'active') = ("resolved_at" IS NULL));
ALTER TABLE "users"
    ADD CONSTRAINT "users_held_tokens_nonnegative" CHECK ("held_tokens" >= 0),
    -- (A balance below 0 is users_token_balance_nonnegative's to report.)
    ADD CONSTRAINT "users_held_tokens_within_balance"
        CHECK ("held_tokens" <= "token_balance" OR "token_balance" < 0);

-- A reference reserves once per user; a ledger row captures one hold.
CREATE UNIQUE INDEX "token_holds_reference_key" ON "token_holds" ("user_id", "reference_id")
    WHERE "reference_id" IS NOT NULL;
CREATE UNIQUE INDEX "token_holds_captured_transaction_key"
    ON "token_holds" ("captured_transaction_id") WHERE "captured_transaction_id" IS NOT NULL;
-- list_holds' pages, and the active holds of a user (the books, the sweep).
CREATE INDEX "token_holds_user_created_idx" ON "token_holds" ("user_id", "created_at" DESC, "id" DESC);
CREATE INDEX "token_holds_active_idx" ON "token_holds" ("user_id", "expires_at")
    WHERE "status" = 'active';

-- 2. A hold is born active, dated by the database.
CREATE FUNCTION "tokendb_hold_new"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF NEW."status" <> 'active' THEN
        RAISE EXCEPTION 'hold %: a hold is created active, not %', NEW."id", NEW."status"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_holds_transition';
    END IF;
    NEW."created_at" := clock_timestamp();
    RETURN NEW;
END
$$;
CREATE TRIGGER "token_holds_new"
    BEFORE INSERT ON "token_holds"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_hold_new"();

-- 3. One move, from active to a final state; what it says never changes.
CREATE FUNCTION "tokendb_hold_transition"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    IF (NEW."id", NEW."user_id", NEW."amount", NEW."expires_at", NEW."created_at")
            IS DISTINCT FROM (OLD."id", OLD."user_id", OLD."amount", OLD."expires_at", OLD."created_at")
       OR NEW."reference_id" IS DISTINCT FROM OLD."reference_id"
       OR NEW."description" IS DISTINCT FROM OLD."description" THEN
        RAISE EXCEPTION 'hold %: id, user, amount, reference, description and dates never change',
            OLD."id"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_holds_immutable';
    END IF;
    IF OLD."status" <> 'active' OR NEW."status" = 'active' THEN
        IF (NEW."status", NEW."resolved_at", NEW."captured_amount", NEW."captured_transaction_id")
                IS DISTINCT FROM
           (OLD."status", OLD."resolved_at", OLD."captured_amount", OLD."captured_transaction_id") THEN
            RAISE EXCEPTION 'hold %: % is final or not a move (to %)', OLD."id", OLD."status",
                NEW."status"
                USING ERRCODE = 'check_violation', CONSTRAINT = 'token_holds_transition';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW."status" = 'expired' AND OLD."expires_at" > clock_timestamp() THEN
        RAISE EXCEPTION 'hold % expires at %: not yet', OLD."id", OLD."expires_at"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_holds_transition';
    END IF;
    IF NEW."status" = 'captured' AND OLD."expires_at" <= clock_timestamp() THEN
        RAISE EXCEPTION 'hold % expired at %: it cannot be captured', OLD."id", OLD."expires_at"
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_holds_transition';
    END IF;
    NEW."resolved_at" := clock_timestamp();
    RETURN NEW;
END
$$;
CREATE TRIGGER "token_holds_transition"
    BEFORE UPDATE ON "token_holds"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_hold_transition"();

CREATE TRIGGER "token_holds_kept"
    BEFORE DELETE ON "token_holds"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_kept"();
CREATE TRIGGER "token_holds_no_truncate" BEFORE TRUNCATE ON "token_holds"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_refuse_truncate"();

-- 4. The books of holds, at commit: held_tokens = Σ active holds, for every
-- user whose held_tokens changed or whose holds were written; a captured
-- hold is billed by its usage row (its user, -captured_amount).
CREATE FUNCTION "tokendb_holds_books"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    owner_id pg_catalog.uuid;
    cached pg_catalog.int4;
    active pg_catalog.int8;
    billed record;
BEGIN
    IF TG_TABLE_NAME = 'users' THEN
        owner_id := NEW."id";
    ELSE
        owner_id := NEW."user_id";
        IF NEW."status" = 'captured' THEN
            SELECT "user_id", "type", "amount" INTO billed FROM @schema."token_transactions"
                WHERE "id" = NEW."captured_transaction_id";
            IF billed."user_id" IS DISTINCT FROM NEW."user_id" OR billed."type" <> 'usage'
               OR billed."amount" <> -NEW."captured_amount" THEN
                RAISE EXCEPTION 'hold % captured % tokens but transaction % is not that charge',
                    NEW."id", NEW."captured_amount", NEW."captured_transaction_id"
                    USING ERRCODE = 'check_violation', CONSTRAINT = 'token_holds_books';
            END IF;
        END IF;
    END IF;
    SELECT "held_tokens" INTO cached FROM @schema."users" WHERE "id" = owner_id;
    IF NOT FOUND THEN
        RETURN NULL;  -- deleted later in the transaction (by the owner)
    END IF;
    SELECT coalesce(sum("amount"), 0) INTO active FROM @schema."token_holds"
        WHERE "user_id" = owner_id AND "status" = 'active';
    IF active <> cached THEN
        RAISE EXCEPTION 'held_tokens of user % is % but its active holds add up to %',
            owner_id, cached, active
            USING ERRCODE = 'check_violation', CONSTRAINT = 'users_held_tokens_follow_holds';
    END IF;
    RETURN NULL;
END
$$;
CREATE CONSTRAINT TRIGGER "token_holds_books"
    AFTER INSERT OR UPDATE ON "token_holds"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION "tokendb_holds_books"();
CREATE CONSTRAINT TRIGGER "users_held_tokens_follow_holds"
    AFTER UPDATE OF "held_tokens" ON "users"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW."held_tokens" IS DISTINCT FROM OLD."held_tokens")
    EXECUTE FUNCTION "tokendb_holds_books"();
CREATE CONSTRAINT TRIGGER "users_held_tokens_follow_holds_on_insert"
    AFTER INSERT ON "users"
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW."held_tokens" <> 0)
    EXECUTE FUNCTION "tokendb_holds_books"();
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TRIGGER IF EXISTS "users_held_tokens_follow_holds_on_insert" ON "users";
DROP TRIGGER IF EXISTS "users_held_tokens_follow_holds" ON "users";
DROP TABLE IF EXISTS "token_holds";
DROP FUNCTION IF EXISTS "tokendb_holds_books"();
DROP FUNCTION IF EXISTS "tokendb_hold_transition"();
DROP FUNCTION IF EXISTS "tokendb_hold_new"();
ALTER TABLE "users"
    DROP CONSTRAINT IF EXISTS "users_held_tokens_within_balance",
    DROP CONSTRAINT IF EXISTS "users_held_tokens_nonnegative";
ALTER TABLE "users" DROP COLUMN IF EXISTS "held_tokens";
"""


MODELS_STATE = (
    "eJztXV1zmzgU/SsMT+lMNpOmTZp6dnbGdkjrbWxnbNztdrNDZSPHTEBQEEk83f73lWQwIM"
    "A2jkkw1VPiK10+zkWXe44E/JCxfQeRPj5qOsYnOJcb0g8ZAQuSf/imQ0kGjhNroBYMxibr"
    "DBxDu4Nzj3Ube9gFE0zsU2B6kJh06E1cw8GGjYgV+aZJjfaEdDTQbWTykfHdhxq2byGeQZ"
    "c0/PMvMRtIh4/QC386d9rUgKaeOFxDp/tmdg3PHWYbjToXl6wn3d1Ym9imb6GotzPHMxst"
    "u/u+oR9RH9p2CxF0AYZ67DToUQZnHJoWR0wM2PXh8lD1yKDDKfBNCob8+9RHE4qBFGJr6N"
    "4Rgg+aof8RHGKsu6b1+qo2VFRNkwtgOLERxd9AmAL24+diuxEwzCrTHbQ/NgcHb85eMShs"
    "D9+6rJHBJv9kjgCDhSsDP0KbxFqbAW+Wxrw9A2425nEfDnlywOVgHsJUArCyBR41E6JbPC"
    "M/T05PVyD9uTlgYJNeDG2bjI/FwOkFTSeLNop6EmXHhVPjsSjOkddukA4NEdTR0H5+rI83"
    "gfo4H+ljHmj2twDEYf8agvv6eBN0Sa9ceFlbEl8HupbheeTAvDTMfw77vWyYOTcObd2YYO"
    "k/yTQ8XBbqsZQ99g0TG8g7ovt7iWxNYaJbtjzvuxlH/KDb/MIHo33Vb/FpnW6gxQXG8DRy"
    "pzbuM67+lm2bEKCc+2fcj4vLmDiWFZAwwT8v9K1+/yoBfaujcoCPui2FDAsWB9LJwMzc6a"
    "kc4CbwsOZ7UNcATmN+QeDChgWzQed9+fEQOB+F/2wQhADPqqSiFTFQO11lqDa714lAXDRV"
    "hbacMOucsx6cceNiuRHpr476UaI/pa/9nsIPlWU/9atMjwn42NaQ/aABPY5JaA5NiUjDR8"
    "cgm9sizklPEeUqR3niQor7FlFOeu4gypWrK8gJ6n1kzoMrcE/CHgyWlVEnSdjVijHOmMsu"
    "aWd1h/IadkmJ/PQuk1xSqNLQXtouNG7RJzhnAHfIcQA0ySpAQnY9Crazn5hG1uiidMHDUv"
    "qIX1Hk5HVowkXR0W4O280LRWYQj8Hk7gG4upaD9WQGsObBvNq8FbhffhpAE7Azyceb8CU8"
    "XGyqRrAzGO0TOwZfAth0k3Vi8RaAwC07Jbpvuqc4Zl2CGWmWs9S3ePvhSgmORdJadBU63C"
    "+iw7mEo2ULFwryrVSiTGAf+lZZxJBHQ2XQkGiqu0HN4bBDbtw9tSEBkmXoaeEbNPx7qCrd"
    "huTNPQwtebPSJCF5vN9A8HifK3e858UOsi8MUUY9qMJHnFMLRi5VjsZOKnzli7paxlhWel"
    "f93oewO69tJCFn4zjj9tVBOYBHDhzeBipNTCqz1GZ3j99OXr999/b8zdnbc9KFHejS8m5F"
    "SNIqxQKeQGuY4qxybA20nK9AOQNlwR3zoa4vdwyK7YL0MeklGORqBulFLOSpJLKepOaQ45"
    "LJy6sonSydIYUByGNIsQCtY0hxrisYUv0ZUqwc2a6Ied7y5XhPahfLJhkim3lmI7p0qAXB"
    "SRLI002mzE/zZ8xPUxPmojT8FUtDkmm3inncT0wXVnm6MFgnWbD4T3qJ4p9LlmI2TszGvT"
    "iDWjsbl5EGdgFrtDy7psAmk18C2wHJx4NOW91sqjM+N/bEWc7YjFxNUC93llOlfz/aHBFO"
    "tx6u5O/Mps1susvDDdi7zDbsSSTVQfce6tLUdiUgTWzLIVcQZbcPM9uDxOBhyfAkZGPpjt"
    "y5kTSHWDpoEMrS+BYeJNvtt1dH/ARTaTsRCkOF7o+HKxQGYNl+1nRfrrgQOYhpkQxpgdzy"
    "sJ+RpTeb1Y68n09okKO10EXmtptttfNZaUgL7xvUbl6ro4Fy0ZAmwMG+C/UbNFCulOaQ2l"
    "xy2wMetSlfrjus22KhqL7NnPf5BorFea5gcc7rFS6cQheSeBSsw3m/J2Sh/WGtBahNfOcp"
    "WPPXE3BuW42E/cGzlCUFFVq+XbWEXydBRgit+TeM+gqtZEu2eb9V2DlXIbdWenQHdZRWuE"
    "bP8NyqWK9YcHe+hCmEiewDeYAxuoIl4IpNiGpQCN1C6K6YHpsndEdi7LoEsQuQmeqmJre5"
    "lylhLd4r8mNhMbx8kTceklytl4vbWsk3duZi3ZZQVYWqus2SfopGCs3NNNXQt8pLt2S1fz"
    "26JoPCdnznBo2GzQ8KfXCIJCuqol6OekxDJQNEv0Gtfm80bEhjGy2k4qLq6dkG6inPeyL1"
    "9IxXT4XK91Iqn9Cty2EqY2DSTFL44aGUn8jl4sGhQlDXV7QU7F+w/xdno+vZ/wuxT4Z7Fu"
    "MMA7KCZdKTEsTyFyGW0AJGoSdXlg7ipaWbvLTUAZ73YJPxXPT9sCnHKtPNKiEu3l5a7ttL"
    "9+slK8tKptBStItup9eQgG4ZiIon4UtXthFHNrnC86/v1NW9kIADYliASqb8xEOcPI+csU"
    "5F353CeQlYBT0X9JxA7OhbRj3pKaJelahnLDFaPiqTIrbrnj6KfyHjCU8f1e5xr2TmFG+j"
    "LALX8lGoJ8CUePiqjiDxiweeilWxRSd7A1mp4lwTusZkJmfJc0HT4erPC0WdKqPQ5dbHmQ"
    "JdRlkcFBXV1Yp2UhbnC3H30M1+SVe+chFzqaF4UYo4REdVAYSD7jVEtxRpKPddr/kftcl/"
    "1+szfNDmZWbldvbpmgKV9+7vZz//Bw1F0xE="
)
