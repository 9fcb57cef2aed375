"""The verify cache's invalidations: every change that may alter a verification is NOTIFYed.

Hand-written. ``tokendb.verify_api_key`` keeps verified keys in each
process (:mod:`tokendb._key_cache`), answered from memory only while its
listener is synchronised with ``pg_notify('tokendb_api_keys', …)`` sent here,
at the commit of the change, by whichever client made it (raw SQL too):

* ``api_keys``: a deleted or changed key notifies its ``key_hash`` (both
  hashes when it changed). An inserted key does not: only keys that were
  found are cached, and a new hash was never found. An UPDATE that changes only
  ``last_used_at`` (verify's throttled touch) notifies nothing: the row's
  other columns are compared as JSON, so a column added later is covered.
* ``users``: a changed user (anything but ``token_balance``,
  ``held_tokens`` and ``updated_at``, which charges and holds write) notifies ``u:<id>``: its keys carry
  the user (role, email). Compared as JSON too. A deleted user deletes its
  keys (ON DELETE CASCADE), which notify.
* TRUNCATE of either table notifies ``*`` (empty the cache).

Threat model as in migration 2: the application role may send any DML but
cannot disable triggers (owner) or set ``session_replication_role``
(superuser), so no change to a key escapes its notification. NOTIFY is
transactional: a rolled-back change sends nothing.
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return UPGRADE


UPGRADE = """
SELECT set_config('search_path', quote_ident(current_schema()) || ', pg_temp', true);

CREATE FUNCTION "tokendb_notify_api_key"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify('tokendb_api_keys', OLD."key_hash");
    IF TG_OP = 'UPDATE' AND NEW."key_hash" IS DISTINCT FROM OLD."key_hash" THEN
        PERFORM pg_notify('tokendb_api_keys', NEW."key_hash");
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER "api_keys_notify"
    AFTER DELETE ON "api_keys"
    FOR EACH ROW EXECUTE FUNCTION "tokendb_notify_api_key"();
CREATE TRIGGER "api_keys_notify_update"
    AFTER UPDATE ON "api_keys"
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'last_used_at') IS DISTINCT FROM (to_jsonb(NEW) - 'last_used_at'))
    EXECUTE FUNCTION "tokendb_notify_api_key"();

CREATE FUNCTION "tokendb_notify_user"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify('tokendb_api_keys', 'u:' || OLD."id"::text);
    RETURN NULL;
END
$$;
CREATE TRIGGER "users_notify_update"
    AFTER UPDATE ON "users"
    FOR EACH ROW
    WHEN ((to_jsonb(OLD) - 'token_balance' - 'held_tokens' - 'updated_at')
          IS DISTINCT FROM (to_jsonb(NEW) - 'token_balance' - 'held_tokens' - 'updated_at'))
    EXECUTE FUNCTION "tokendb_notify_user"();

CREATE FUNCTION "tokendb_notify_truncate"() RETURNS trigger
    LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_notify('tokendb_api_keys', '*');
    RETURN NULL;
END
$$;
CREATE TRIGGER "api_keys_notify_truncate" AFTER TRUNCATE ON "api_keys"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_notify_truncate"();
CREATE TRIGGER "users_notify_truncate" AFTER TRUNCATE ON "users"
    FOR EACH STATEMENT EXECUTE FUNCTION "tokendb_notify_truncate"();
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TRIGGER IF EXISTS "users_notify_truncate" ON "users";
DROP TRIGGER IF EXISTS "api_keys_notify_truncate" ON "api_keys";
DROP FUNCTION IF EXISTS "tokendb_notify_truncate"();
DROP TRIGGER IF EXISTS "users_notify_update" ON "users";
DROP FUNCTION IF EXISTS "tokendb_notify_user"();
DROP TRIGGER IF EXISTS "api_keys_notify_update" ON "api_keys";
DROP TRIGGER IF EXISTS "api_keys_notify" ON "api_keys";
DROP FUNCTION IF EXISTS "tokendb_notify_api_key"();
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
