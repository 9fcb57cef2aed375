"""The ledger's statement triggers check and roll up set by set, not group by group.

``tokendb_ledger_books`` (migration 2) looped over the statement's users
and, for billed messages, over its rows, running two lookups per user;
``tokendb_usage_rollup`` (migration 7) ran one upsert per (user, key, model,
day) group. On a coalesced batch of 64 charges of 64 users that was ~130
statements inside the triggers, 1.9 ms of the batch's 7.5 ms (``python -m
bench.triggers``). Each is now a few set-based statements over the
transition table, planned once a session: the same checks, the same errors
(codes, constraint names and messages), the same rollup.
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once, current_schema

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return UPGRADE.replace("@schema.", f"{await current_schema(db)}.")


async def downgrade(db: BaseDBAsyncClient) -> str:
    return DOWNGRADE.replace("@schema.", f"{await current_schema(db)}.")


UPGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE OR REPLACE FUNCTION "tokendb_ledger_books"() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bad pg_catalog.record;  -- never a TEMP type of that name
BEGIN
    -- "inserted" is the statement's new rows (a transition table: no TEMP
    -- table can stand in for it). Each touched user's balance is its newest
    -- row's balance_after (one index probe per user, in one statement).
    -- Every lookup is a LATERAL subquery with a LIMIT (which keeps the planner
    -- from flattening it into a join): a probe of its index per row of
    -- "inserted", never a hash join reading the whole table, which the
    -- planner may pick when it re-plans, and which grows with the table.
    SELECT o."user_id" AS owner_id, u."token_balance" AS balance, last."balance_after" AS after
        INTO bad
    FROM (SELECT DISTINCT "user_id" FROM inserted) o
    LEFT JOIN LATERAL (
        SELECT "token_balance" FROM @schema."users" WHERE "id" = o."user_id" LIMIT 1
    ) u ON true
    LEFT JOIN LATERAL (
        SELECT t."balance_after" FROM @schema."token_transactions" t
        WHERE t."user_id" = o."user_id" ORDER BY t."seq" DESC LIMIT 1
    ) last ON true
    WHERE u."token_balance" IS DISTINCT FROM last."balance_after"
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'token_balance of user % is % but its ledger says %: '
            'a ledger row comes with its balance', bad.owner_id, bad.balance, bad.after
            USING ERRCODE = 'check_violation', CONSTRAINT = 'users_balance_follows_ledger';
    END IF;
    -- A usage row that names a message of its user bills that message's tokens.
    SELECT i."id" AS row_id, -i."amount" AS billed, m."id" AS message_id, m."tokens" AS tokens
        INTO bad
    FROM inserted i
    JOIN LATERAL (
        SELECT m."id", m."tokens"
        FROM @schema."chat_messages" m JOIN @schema."chat_sessions" s ON s."id" = m."session_id"
        WHERE m."id" = i."reference_id" AND s."user_id" = i."user_id"
        LIMIT 1
    ) m ON true
    WHERE i."type" = 'usage' AND i."reference_id" IS NOT NULL AND -i."amount" <> m."tokens"
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'usage row % bills % tokens for message % of % tokens',
            bad.row_id, bad.billed, bad.message_id, bad.tokens
            USING ERRCODE = 'check_violation', CONSTRAINT = 'chat_messages_billed';
    END IF;
    RETURN NULL;
END
$$;

-- SECURITY DEFINER: the application role cannot write usage_daily itself.
CREATE OR REPLACE FUNCTION "tokendb_usage_rollup"() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    bad pg_catalog.record;  -- never a TEMP type of that name
BEGIN
    -- A usage row's key is its user's (token_transactions_api_key_owner).
    SELECT i."api_key_id" AS key_id, i."user_id" AS owner_id INTO bad
    FROM inserted i
    LEFT JOIN LATERAL (
        SELECT "user_id" FROM "api_keys" WHERE "id" = i."api_key_id" LIMIT 1
    ) k ON true
    WHERE i."type" = 'usage' AND i."api_key_id" IS NOT NULL
      AND k."user_id" IS DISTINCT FROM i."user_id"
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'API key % is not a key of user %', bad.key_id, bad.owner_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'token_transactions_api_key_owner';
    END IF;
    -- A refund carries its charge's key and model (token_transactions_refund_within_charge
    -- has checked that the charge is a usage row of this user).
    SELECT i."reference_id" AS charge_id INTO bad
    FROM inserted i
    LEFT JOIN LATERAL (
        SELECT "api_key_id", "model" FROM "token_transactions" WHERE "id" = i."reference_id" LIMIT 1
    ) c ON true
    WHERE i."type" = 'refund'
      AND (c."api_key_id" IS DISTINCT FROM i."api_key_id" OR c."model" IS DISTINCT FROM i."model")
    LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'a refund of % must carry its API key and model', bad.charge_id
            USING ERRCODE = 'check_violation',
                  CONSTRAINT = 'token_transactions_refund_attribution';
    END IF;
    -- A usage row adds its tokens and one request to its own UTC day; a refund
    -- takes its tokens off its charge's day and leaves requests alone. One
    -- upsert for the statement: grouped by the rollup's key, so no row twice.
    INSERT INTO "usage_daily" AS d ("user_id", "api_key_id", "model", "day", "tokens", "requests")
    SELECT i."user_id", i."api_key_id", i."model",
           ((CASE i."type" WHEN 'usage' THEN i."created_at" ELSE c."created_at" END)
               AT TIME ZONE 'UTC')::date,
           -sum(i."amount"), count(*) FILTER (WHERE i."type" = 'usage')
    FROM inserted i
    LEFT JOIN LATERAL (
        SELECT "created_at" FROM "token_transactions"
        WHERE i."type" = 'refund' AND "id" = i."reference_id"
        LIMIT 1
    ) c ON true
    WHERE i."type" IN ('usage', 'refund')
    GROUP BY 1, 2, 3, 4
    ON CONFLICT ("user_id", "day", "api_key_id", "model") DO UPDATE
    SET "tokens" = d."tokens" + excluded."tokens", "requests" = d."requests" + excluded."requests";
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION "tokendb_usage_rollup"() FROM PUBLIC;
"""

DOWNGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE OR REPLACE FUNCTION "tokendb_ledger_books"() RETURNS trigger LANGUAGE plpgsql AS $$
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

CREATE OR REPLACE FUNCTION "tokendb_usage_rollup"() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    g record;
    key_owner uuid;
    charge record;
BEGIN
    FOR g IN
        SELECT "type" AS kind, "user_id" AS owner_id, "api_key_id" AS key_id, "model" AS model,
               CASE "type" WHEN 'usage' THEN ("created_at" AT TIME ZONE 'UTC')::date END AS day,
               CASE "type" WHEN 'refund' THEN "reference_id" END AS charge_id,
               -sum("amount") AS tokens, count(*) AS requests
        FROM inserted WHERE "type" IN ('usage', 'refund')
        GROUP BY 1, 2, 3, 4, 5, 6
    LOOP
        IF g.kind = 'refund' THEN
            -- token_transactions_refund_within_charge: a usage row of this user.
            SELECT "api_key_id", "model", "created_at" INTO charge
            FROM "token_transactions" WHERE "id" = g.charge_id;
            IF charge."api_key_id" IS DISTINCT FROM g.key_id
               OR charge."model" IS DISTINCT FROM g.model THEN
                RAISE EXCEPTION 'a refund of % must carry its API key and model', g.charge_id
                    USING ERRCODE = 'check_violation',
                          CONSTRAINT = 'token_transactions_refund_attribution';
            END IF;
            g.day := (charge."created_at" AT TIME ZONE 'UTC')::date;
            g.requests := 0;
        ELSIF g.key_id IS NOT NULL THEN
            SELECT "user_id" INTO key_owner FROM "api_keys" WHERE "id" = g.key_id;
            IF key_owner IS DISTINCT FROM g.owner_id THEN
                RAISE EXCEPTION 'API key % is not a key of user %', g.key_id, g.owner_id
                    USING ERRCODE = 'check_violation',
                          CONSTRAINT = 'token_transactions_api_key_owner';
            END IF;
        END IF;
        INSERT INTO "usage_daily" AS d ("user_id", "api_key_id", "model", "day", "tokens", "requests")
        VALUES (g.owner_id, g.key_id, g.model, g.day, g.tokens, g.requests)
        ON CONFLICT ("user_id", "day", "api_key_id", "model") DO UPDATE
        SET "tokens" = d."tokens" + excluded."tokens", "requests" = d."requests" + excluded."requests";
    END LOOP;
    RETURN NULL;
END
$$;
REVOKE ALL ON FUNCTION "tokendb_usage_rollup"() FROM PUBLIC;
"""

MODELS_STATE = (
    "eJztXf9zojgU/1cYf+rO9Dpd+925uRm1duttq52Ke7t73nBRYs0UAguhrbPX//2SCAIBrF"
    "htkc1Pti95ED4vX977vAR+Voh1D7E+3Kvb6DOcVmrKzwoGJqR/iEW7SgXYdqSASQgYGrwy"
    "sJF2D6curzZ0iQNGhMrHwHAhFenQHTnIJsjCVIo9w2BCa0QrInwXijyMfnhQI9YdJBPo0I"
    "K//6FihHX4BN3gX/teGyNo6LHmIp3dm8s1MrW5rN9vn1/wmux2Q21kGZ6Jw9r2lEwsPK/u"
    "eUjfYzqs7A5i6AAC9chjsFb6TxyIZi2mAuJ4cN5UPRTocAw8g4FR+X3s4RHDQAmwRbq7h+"
    "GjhvQ//CZGqmtap6tqvZaqaZUcGI4szPBHmDDAfj7PrhsCw6UVdoPmZf125+D4A4fCcsmd"
    "wws5bJVnrggImKly8EO0qa21CXAnScybE+CkYx7VEZCnDd4M5gFMGwC2YoInzYD4jkzov9"
    "WjowVIf6nfcrBpLY62RcfHbOB0/KLqrIyhHkfZduAYPeXFOdRaD9KBIIQ6HNpvj/X+MlDv"
    "ZyO9LwLNf3NAHNQvIbgf95dBl9bKhJeXxfG1oWMi16UNc5Mw/9nrdtJhFtQEtHU0Isp/io"
    "FcsinUI1P20EMGQdjdY/d7j9mawcSubLruDyOK+M51/atojOZVtyFO6+wCDcEwyNXoSo0e"
    "Unp/w7IMCHDG+hnVE+wypIqbMkgwwb8t9I1u9yoGfaOtCoD3rxstOiy4HWglRLi43VEFwA"
    "3gEs1zoa4BksT8nMJFkAnTQRd1xfHgK+8FfyxhBB/PokxFC2ygtq9bPbV+fRMzxHldbbGS"
    "KpdOBenOsTAu5hdR/mqrlwr7V/ne7bTEoTKvp36vsDYBj1gath41oEcxCcSBKGZp+GQjer"
    "kV7BzXlFYuspVHDmS4r2DluOYarFw4v4I+oN7FxtTvgVtidn+wLLQ6j980A5koxewNdNfG"
    "JN3ogqJgdYrc9o1m2lz689tZtXpwcFLdPzg+PTo8OTk63T+ldXmDk0Unixbb9ie2bMZMm7"
    "KOMgg16iAiKyXwZ557C3smN0KbNhfgEUyup8I1VvLm38YatNd/qyk6mA7wdbejXtYU08Jk"
    "MsBqV61f0VZYBHCnK6+7v0zUmh2zJiJW6p04Wj4qJqKyTj6muGvcC7QLY7jG96msC4MqCe"
    "2F5UB0hz/DaaK7C4AGtFPfv852YhpKw+HngMc5JxjtUfThdWjAmTferPea9fNWhUM8BKP7"
    "R+DoWgbWowkgmguzgtaGr37x+RYagD9JNt50OiK92aVKBHt8RXQAdgEPlV+Llsp+1fB6hZ"
    "mEX48Y63hW1Yp0uFhXTBaZVVOUAAzu+COxe7M7RXvZNe1lgC/ISSI/Wr67kM3nfd+cVZWU"
    "/i9C6TuWkcGBvuxJBbpF5kMr/V7rtqawxWGA671em8YAHbWmADovs8ciA9z71lNb1zXFnb"
    "oEmqu4U2dLuFNnme7UmehO0XsRiFNiDBU+ZUQYEZUiW2MtZEHrq7qYEZ0HjVfdzqegukiT"
    "PidDu5QlbHFIl8ZPLxfNFQ1vP5yrfjw8OTw9OD6cR3FzyaLgLRmozeDxacsxSXNgX4BW0J"
    "Uop6AsaahsqMtLQ/nhSc6AO64lY+7FMbcbxm2vDbvLGQbuCtF3vHvlDcA3HiEFBsiKkCIG"
    "eilCirIDMkIqf4QUcUdWc2Le1n3Z3xLfxbToDJEeeaYjOlcoRYAj8PHL7L45yt58c5TYey"
    "Ndw1/RNaQz7Uo2j+rJnQdF3nngb7nO6fzHtaTzL/OXMn/5xpi+Pn+ZMg2sA9bwpEdJgY1P"
    "fjFsb+l8fNtuqsslh6O5sVfmhSMZuZKgvtksJ88OX1pCIJws3V0Yv8/2YU0sdsvdJaL3Cr"
    "+wq9CpDjoPUFfGlqMAZWSZNu1BLLp9nFgupAKXKMhVsEWUe7pyY2UKibJToyFL7d+gkfy2"
    "/37YExNMG7uJZBgKtD7uLmAYgGl5aem+THIhVJBpkRRqgS55xEuZpZfLaofab0c0VMJjFX"
    "ly2/Wm2v7Sqikz7QFu1m/U/m3rvKaMgE08B+oDfNu6atV7TObQZQ+4TNb6etPm1WZ7zvVV"
    "ct6nSzAWp5mExanIVzhwDB1I7ZHTDxf1XjELbU/UmiO0id48AWv2fgJBrcB7ZAu7paBAJ0"
    "GKNuGXiZCRRGv2glFeopVeyTIeVjK7oCrp1kKPbt+P0nL76CmaJTr3s61pwKKhueEs4Dtn"
    "CwqG9no86vnAjhx+yAnwgktItGVqRqZmCpZByErNhOmDlyaIdYBc3hNSIt4L5scl8H+P3N"
    "iWAv3K1NjmUz7R7p6Z+RHGxIsJIPHUotzFKXMsMseS84APQyOB5nIZlkC3yBs5K2r3pn/D"
    "XrFge/YA93v1Ty12jJBOViynctHv8IwKHSD6ADe6nX6vpgwtPEsc5Q38jpeI+0QWJAz7js"
    "WoT3L+78X5yyzWZqLAITDYTJL7KGFCT87l8hhhLqjLm8KQzKtkXrdrFZBcoOQC350yyccF"
    "Si6qFFwU79Np/FPQ2RdwTqzDSJrpF6GZoAlQLqdqriC/jbDMtxFs4LqPFh3PeT9DkVAsMv"
    "lUJMTlRxI2+5GE7XoB29xLzLVN/fy63akpQDcRZlRq8EK2VajSNb+5dpYQ8mmiHMRSQk++"
    "4EFklSa8Ut73qglaElZJ1kmyjkJs6ytaPa4prV4Uq6dsP54fo00Eti+dTI5+iC/eOXKdTC"
    "7dUfD4zCnf7Z0Hrvkx6VfAFDuYXUaQ3vcF6FsD2UbJuTp00GhSSaPn/KLdxV8xDSsVhqHL"
    "9I9TCboUt9h3KorLFa3FLc4m4h6gk/4Cz2zmIqJSQvJiI+QQG1U5EParlxDdjVBDme+Bz/"
    "52ZvZ74N/gu5nvk/Fc2xcyc3je61/Pnv8H0QfU3A=="
)
