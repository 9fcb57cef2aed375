"""A hold's capture is billed to the hold's API key and model.

A hold names the key whose limit it counts against and a model (migration
9), and neither changes (migration 11), but ``tokendb_holds_books``
(migrations 3 and 10) checked only the capturing usage row's user, amount
and date: the application role could capture a hold with a usage row
billed to another of the user's keys, to no key or to another model. That
freed the key's hold (its limit's window lost the tokens) and booked them
elsewhere in ``usage_daily``. Now the usage row must carry the hold's
``api_key_id`` and ``model`` when the hold names them (the same row the
check already reads: no extra query). A hold that names neither reserved
nothing against a key: any of the user's usage rows may capture it, as
``add_message`` does with its session's key and model.
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
            SELECT "user_id", "type", "amount", "created_at", "api_key_id", "model" INTO billed
                FROM @schema."token_transactions" WHERE "id" = NEW."captured_transaction_id";
            IF billed."user_id" IS DISTINCT FROM NEW."user_id" OR billed."type" <> 'usage'
               OR billed."amount" <> -NEW."captured_amount"
               OR billed."created_at" < NEW."created_at"
               OR billed."api_key_id" IS DISTINCT FROM coalesce(NEW."api_key_id", billed."api_key_id")
               OR billed."model" IS DISTINCT FROM coalesce(NEW."model", billed."model") THEN
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
