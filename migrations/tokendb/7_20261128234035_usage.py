"""Usage per API key and model: what a ledger row paid for, a daily rollup, per-key limits.

Aerich generated the four columns and the foreign key; the rest is written
by hand. Threat model as in migration 2: the application role may send any
DML on tokendb's five tables, and is neither the owner nor a superuser.

* ``token_transactions.api_key_id`` / ``model``: what a usage row paid for.
  A refund carries its charge's (``token_transactions_refund_attribution``),
  a top-up or a bonus neither (``token_transactions_attribution``), and the
  key belongs to the row's user (``token_transactions_api_key_owner``; a
  key's ``user_id`` never changes, migration 1).
* ``usage_daily``: tokens and requests per (user, key, model, UTC day), with
  NULL for "no key" / "no model" (one row each: ``UNIQUE NULLS NOT
  DISTINCT``). Written by the statement trigger ``token_transactions_usage_rollup``
  at the end of every statement that inserts usage or refund rows, so the
  rollup follows the ledger whoever writes it. A usage row adds its tokens
  and one request to its own day; a refund takes its tokens off the
  *charge's* group and day (so refunding gives the charge's window its
  tokens back) and leaves ``requests`` alone. The function is the owner's
  (``SECURITY DEFINER``): the application role may read ``usage_daily``
  but not write it (``tokendb grant`` gives it SELECT only), so nothing but
  the ledger moves the rollup. Existing rows are rolled up here.
* ``api_keys.token_limit`` / ``limit_period``: both NULL (no limit), or a
  positive limit per ``day``, ``month`` (UTC calendar windows) or ``total``
  (``api_keys_token_limit_valid``). tokendb's operations decide the limit
  under the key's row lock; the database does not (a DML-only client that
  writes usage rows itself is bounded by the balance, not by the key).
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

ALTER TABLE "api_keys" ADD "token_limit" BIGINT;
ALTER TABLE "api_keys" ADD "limit_period" VARCHAR(5);
ALTER TABLE "token_transactions" ADD "model" VARCHAR(50);
ALTER TABLE "token_transactions" ADD "api_key_id" UUID;
COMMENT ON COLUMN api_keys."limit_period" IS 'DAY: day\nMONTH: month\nTOTAL: total';
ALTER TABLE "token_transactions" ADD CONSTRAINT "token_transactions_api_key_id_fkey"
    FOREIGN KEY ("api_key_id") REFERENCES "api_keys" ("id") ON DELETE RESTRICT;

ALTER TABLE "api_keys" ADD CONSTRAINT "api_keys_token_limit_valid" CHECK (
    ("token_limit" IS NULL AND "limit_period" IS NULL)
    OR ("token_limit" > 0 AND "limit_period" IN ('day', 'month', 'total'))
);
ALTER TABLE "token_transactions" ADD CONSTRAINT "token_transactions_attribution" CHECK (
    "type" IN ('usage', 'refund') OR ("api_key_id" IS NULL AND "model" IS NULL)
);

CREATE TABLE "usage_daily" (
    "user_id" UUID NOT NULL REFERENCES "users" ("id") ON DELETE RESTRICT,
    "api_key_id" UUID REFERENCES "api_keys" ("id") ON DELETE RESTRICT,
    "model" VARCHAR(50),
    "day" DATE NOT NULL,
    "tokens" BIGINT NOT NULL,
    "requests" INT NOT NULL,
    CONSTRAINT "usage_daily_group_key" UNIQUE NULLS NOT DISTINCT ("user_id", "day", "api_key_id", "model")
) WITH (fillfactor = 80);  -- room for HOT updates: a group's row changes with every charge
COMMENT ON TABLE "usage_daily" IS
    'tokens (net of refunds) and requests per user, API key, model and UTC day; '
    'written only by token_transactions_usage_rollup';
-- A key's window (the limit check) without the user's other keys and days.
CREATE INDEX "usage_daily_key_day_idx" ON "usage_daily" ("api_key_id", "day")
    WHERE "api_key_id" IS NOT NULL;
CREATE TRIGGER "usage_daily_no_truncate" BEFORE TRUNCATE ON "usage_daily"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_refuse_truncate"();

-- The rollup of the rows already there (they have neither key nor model).
INSERT INTO "usage_daily" ("user_id", "api_key_id", "model", "day", "tokens", "requests")
SELECT t."user_id", NULL, NULL, (coalesce(c."created_at", t."created_at") AT TIME ZONE 'UTC')::date,
       -sum(t."amount"), count(*) FILTER (WHERE t."type" = 'usage')
FROM "token_transactions" t
LEFT JOIN "token_transactions" c ON t."type" = 'refund' AND c."id" = t."reference_id"
WHERE t."type" IN ('usage', 'refund')
GROUP BY 1, 4;

-- The rollup, at the end of each statement that inserts ledger rows: one
-- scan of the statement's rows (a transition table, which no TEMP table can
-- stand in for), grouped; then one upsert per group, planned once a session.
-- SECURITY DEFINER: the application role cannot write usage_daily itself.
CREATE FUNCTION "tokendb_usage_rollup"() RETURNS trigger
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
CREATE TRIGGER "token_transactions_usage_rollup"
    AFTER INSERT ON "token_transactions"
    REFERENCING NEW TABLE AS inserted
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_usage_rollup"();
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TRIGGER IF EXISTS "token_transactions_usage_rollup" ON "token_transactions";
DROP FUNCTION IF EXISTS "tokendb_usage_rollup"();
DROP TABLE IF EXISTS "usage_daily";
ALTER TABLE "token_transactions" DROP CONSTRAINT IF EXISTS "token_transactions_attribution";
ALTER TABLE "api_keys" DROP CONSTRAINT IF EXISTS "api_keys_token_limit_valid";
ALTER TABLE "token_transactions" DROP CONSTRAINT IF EXISTS "token_transactions_api_key_id_fkey";
ALTER TABLE "api_keys" DROP COLUMN "token_limit";
ALTER TABLE "api_keys" DROP COLUMN "limit_period";
ALTER TABLE "token_transactions" DROP COLUMN "model";
ALTER TABLE "token_transactions" DROP COLUMN "api_key_id";
"""


MODELS_STATE = (
    "eJztXVtv4jgU/isRTx2pW3XoHa1WAkqn7LRQlTA7M8sqa4gpVhMnkzht0Wz/+9omIYmTUE"
    "KBphk/Acc+jvMdX875fOFnhVj3EOvDvbqNPsNppab8rGBgQvpFTNpVKsC2IwlMQsDQ4JmB"
    "jbR7OHV5tqFLHDAiVD4GhgupSIfuyEE2QRamUuwZBhNaI5oR4btQ5GH0w4Mase4gmUCHJv"
    "z9DxUjrMMn6AY/7XttjKChx6qLdPZsLtfI1Oayfr99fsFzsscNtZFleCYOc9tTMrHwPLvn"
    "IX2P6bC0O4ihAwjUI6/Baum/cSCa1ZgKiOPBeVX1UKDDMfAMBkbl97GHRwwDJcAW6e4eho"
    "8a0v/wqxjJrmmdrqr1WqqmVXJgOLIwwx9hwgD7+TwrNwSGSyvsAc3L+u3OwfEHDoXlkjuH"
    "J3LYKs9cERAwU+Xgh2hTW2sT4E6SmDcnwEnHPKojIE8rvBnMA5g2AGzFBE+aAfEdmdCf1a"
    "OjBUh/qd9ysGkujrZF+8es43T8pOosjaEeR9l24Bg95cU51FoP0oEghDrs2tvHen8ZqPez"
    "kd4XgeafOSAO8pcQ3I/7y6BLc2XCy9Pi+NrQMZHr0oq5SZj/7HU76TALagLaOhoR5T/FQC"
    "7ZFOqRIXvoIYMg7O6x573FaM1gYiWbrvvDiCK+c13/KhqjedVtiMM6K6AhGAa5Gp2p0UNK"
    "629YlgEBzpg/o3qCXYZUcVMGCQb47ULf6HavYtA32qoAeP+60aLdgtuBZkKEi9sdVQDcAC"
    "7RPBfqGiBJzM8pXASZMB10UVfsD77yXvBlCSP4eBZlKFpgA7V93eqp9eubmCHO62qLpVS5"
    "dCpId46FfjEvRPmrrV4q7KfyvdtpiV1lnk/9XmF1Ah6xNGw9akCPYhKIA1HM0vDJRrS4Fe"
    "wc15RWLrKVRw5kuK9g5bjmGqxcOL+CvqDexcbUb4HvxOx+Z1lodR6/aQYyUYrZG+iujUm6"
    "0QVFweoUuffXm2l16cdvZ9XqwcFJdf/g+PTo8OTk6HT/lOblFU4mnSyabNuf2LQZM23KPM"
    "og1KiDiKyUwJ957i3smdwIbVpdgEcwOZ8KZazkzW/HGrTVf6spOpgO8HW3o17WFNPCZDLA"
    "aletX9FaWARwpyuvu79M1JodsyYiVuqdOFo+Kiaisk4+prhz3Au0C2O4xveprAuDKgnthe"
    "VAdIc/w2miuQuABrRT3y/nfWIaSsPu54DHOScYbVH05XVowJk33qz3mvXzVoVDPASj+0fg"
    "6FoG1qMJIJoLs4LWhq9+8fkWGoC/STbedDgivVlRJYI9PiM6ALuAh8qvRUtln2pYXmEG4d"
    "cjxhqeVbUiDS7WFJNJZtUUJQCDO/5K7NnsSdFWdk1bGeATcpLIj6bvLmTzeds3Z1klpf+L"
    "UPqOZWRwoC97UoFukfnQSr/Xuq0pbHIY4Hqv16YxQEetKYCOy+y1yAD3vvXU1nVNcacuge"
    "Yq7tTZEu7UWaY7dSa6U/RZBOKUGEOFTxkRRkSlyNZYC1nQ+qouZkTnQeNVt/MpyC7SpM/J"
    "0C5lClsc0qXx08tFc0XD2w/nqh8PTw5PD44P51HcXLIoeEsGajN4fNpyTNIc2BegFXQlyi"
    "koSxoqG+ry0lB+eJIz4I5ryZh7cczthnHba8PucoaBu0L0HW9eeQPwjUdIgQGyIqSIgV6K"
    "kKLsgIyQyh8hRdyR1ZyY7bov++/EdzEtOkKkR57piM4VShHgCHz8MrtvjrI33xwl9t5I1/"
    "BXdA3pSLuSzaN6cudBkXce+Fuuczr/cS3p/Mv1S7l+uWVMX79+mTIMrAPW8KRHSYGND34x"
    "bG/peHzbbqrLLQ5H18ZeuS4cWZErCeqbXeXkq8OXlhAIJ1N3F8bvs31YE4s9cneJ6L3CC3"
    "YVOtRB5wHqythyFKCMLNOmLYhFt48Ty4VU4BIFuQq2iHJPZ26sTCFRdmo0ZKn9G1SSP/bf"
    "D3viAtPGHiIZhgLNj7sLGAZgWl7acl8muRAqyGWRFGqBTnnESxmll1vVDrW3RzRUwmMVed"
    "a26021/aVVU2baA9ys36j929Z5TRkBm3gO1Af4tnXVqveYzKHTHnCZrPX1ps2zzfac66us"
    "eZ8uwVicZhIWpyJf4cAxdCC1R04/XNR7xSj0fqLWHKFN9OEJWLP3EwhqBd4jW9gtBQU6CV"
    "K0Ab9MhIwkWrMnjPISrbQky3hYyeyCqqRbC927fT9Ky+2jp2iW6NzP+rYwBTBFtpLndAEX"
    "FCG9QUl0S6K7YHxsFtEdkrEvDRDrALm8501EvBeMj7nJ8M2TvFGTZHK9gt1epHzFc0py35"
    "ZkVSWrmnNLP0MjgeZynGqgW+StWxW1e9O/YYeqbc8e4H6v/qnFDg7RwYqxqBf9DudQaQfR"
    "B7jR7fR7NWVo4RlVnJc9PV6CPRXjnpA9PRbZU8nyvRXLJ3nrzUQqQ2CwkST34aGEnhzL5c"
    "GhXFCXl7Tc8pbrgo1Lm95x/cY7MwuGtuSrCgKn5Ku2y1e9xc7MYvb9TW/M3CgXxdt0Gv8U"
    "NPYFnBNrMJJm+kVoJmgClMupmivI29CXuQ3dBq77aNH+nPfi+YRikcmnIiEur0Xf7LXo7+"
    "vKpbmXmGtj6vl1u1NTgG4izKjU4AqmVajSNd9VOVsQ8mmiHMRSQk8e6RZZpQnPlPcmJUFL"
    "wirJOknWUYhtfUWrxzWl1Yti9ZQNh/ODc4nA9qWziNG/3nrFWcTSHf6Mj5zyNt88cM0PRr"
    "4CpthRzDKC9LZXHr8byDZKztWhg0aTSho95yftLv7fwjBTYRi6TP84laBLcYt9p6K4XNFa"
    "3OJsIu4BOulX9mUzFxGVEpIXGyGHWK/KgbCfvYToboQayrz5Ofvf8rJvft7CP+W9zYrn2v"
    "4TL4fnvf757Pl/DlGFQg=="
)
