"""A hold is captured by a usage row written for it, not by an older one.

Migration 3's books accepted any usage row of the hold's user for exactly
the captured amount: the application role could mark a hold ``captured``
naming a charge written before the hold existed (the same amount), which
frees the held tokens with no new debit and makes an old charge look like
the hold's capture. ``tokendb_holds_books`` now also requires the usage row
to be dated no earlier than the hold (both are dated by the database's
clock: a hold at its INSERT, a ledger row no later than its INSERT and
after its chain's previous row, so a row written before the hold is always
dated before it). ``tokendb.audit_holds`` reports the same.
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

CREATE OR REPLACE FUNCTION "tokendb_holds_books"() RETURNS trigger LANGUAGE plpgsql AS $$
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
            SELECT "user_id", "type", "amount", "created_at" INTO billed
                FROM @schema."token_transactions" WHERE "id" = NEW."captured_transaction_id";
            IF billed."user_id" IS DISTINCT FROM NEW."user_id" OR billed."type" <> 'usage'
               OR billed."amount" <> -NEW."captured_amount"
               OR billed."created_at" < NEW."created_at" THEN
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
"""

DOWNGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE OR REPLACE FUNCTION "tokendb_holds_books"() RETURNS trigger LANGUAGE plpgsql AS $$
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
