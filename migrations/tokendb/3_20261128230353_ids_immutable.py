"""A user's and an API key's id never change (found by the adversarial review of issue 9).

Hand-written (no model changes). Every check that keeps the books looks a row
up by its id: the deferred balance checks (``users_balance_follows_ledger``,
``…_on_insert``) by the id the user had when the check was queued, the
foreign keys (``ON UPDATE NO ACTION``) by an id that is still there at the
statement's end. With ``users.id`` writable, the application role could

* set a balance, then rename the user before commit: the check found no user
  under the old id and passed, and the renamed user kept tokens no ledger row
  gave (also with a user inserted with a balance);
* trade ids in one ``UPDATE`` (A gets a new id, B gets A's): the foreign keys
  still found id A, so A's ledger rows, API keys and chats moved to B, and A's
  balance went on with no row behind it;
* likewise trade an API key's id, moving chat sessions between keys (a
  session's key never changes).

The other three tables' ids were already fixed (``token_transactions_append_only``,
``chat_sessions_immutable``, ``chat_messages_immutable``). ``UPDATE OF "id"``:
the trigger is not even considered for an UPDATE that does not set ``id`` (a
charge's), so the hot paths pay nothing. It holds for the owner too (who may
disable it).
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE FUNCTION "tokendb_id_immutable"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RAISE EXCEPTION '% %: an id never changes (its ledger, keys and chats name it)',
        TG_TABLE_NAME, OLD."id"
        USING ERRCODE = 'check_violation', CONSTRAINT = TG_TABLE_NAME || '_id_immutable';
END
$$;
CREATE TRIGGER "users_id_immutable"
    BEFORE UPDATE OF "id" ON "users"
    FOR EACH ROW WHEN (NEW."id" IS DISTINCT FROM OLD."id")
    EXECUTE FUNCTION "tokendb_id_immutable"();
CREATE TRIGGER "api_keys_id_immutable"
    BEFORE UPDATE OF "id" ON "api_keys"
    FOR EACH ROW WHEN (NEW."id" IS DISTINCT FROM OLD."id")
    EXECUTE FUNCTION "tokendb_id_immutable"();
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TRIGGER IF EXISTS "api_keys_id_immutable" ON "api_keys";
DROP TRIGGER IF EXISTS "users_id_immutable" ON "users";
DROP FUNCTION IF EXISTS "tokendb_id_immutable"();
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
