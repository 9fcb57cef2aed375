"""Checkpoints of the incremental ledger audit: how far each user's chain has been audited.

Hand-written (Aerich made the empty file: no model changes). Two tables of
tokendb's own, not models (nothing but the audit statement reads or writes
them, :data:`tokendb._ledger_sql.AUDIT_SINCE_CHECKPOINT`):

* ``tokendb_audit_checkpoints``: one row per incremental audit that found
  the books clean: when, how many ledger rows it read past the previous
  marks, how many users' marks it moved.
* ``tokendb_audit_marks``: per user, the newest ledger row a clean audit
  has covered (its ``seq``, ``balance_after`` and ``id``) and the checkpoint
  that set it. The next incremental audit reads, per user, the rows from
  that ``seq`` on (the ``(user_id, seq)`` index): the marked row must still
  be there, unchanged, and the first new row must continue it.

Why a position per user and not a time or a global counter: ledger rows are
dated (``clock_timestamp()``) and given ids when they are written, and
concurrent transactions commit in another order than that, so "rows after
the checkpoint's time" misses a row whose transaction was still open when
the checkpoint was taken and commits later with an older date. A user's
``seq`` cannot do that: a row takes the next ``seq`` after its user's
newest row, under the user's row lock, and ``(user_id, seq)`` is unique, so
a row that commits after a checkpoint which marked ``seq`` n of its user
has a ``seq`` above n (a second row with ``seq`` ≤ n would collide with the
committed one). No safety margin, no snapshot bookkeeping; the cost is one
index probe per user per audit.

Threat model as in migration 2. The application role may SELECT, INSERT and
UPDATE both tables (it runs the audit); nothing it writes there changes the
books, and ``audit_ledger()`` (the full audit) never reads them. A role that
moves marks forward can make the incremental audit skip rows it would have
read, so the full audit is the one to trust against such a role (the
ledger's own backstops refuse the rows it would skip).
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return UPGRADE


UPGRADE = """
CREATE TABLE "tokendb_audit_checkpoints" (
    "id" UUID NOT NULL PRIMARY KEY,
    "created_at" TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    "rows_audited" BIGINT NOT NULL,
    "users_advanced" INT NOT NULL
);
COMMENT ON TABLE "tokendb_audit_checkpoints" IS
    'incremental ledger audits that found the books clean (tokendb.audit_ledger(since_checkpoint=True))';

CREATE TABLE "tokendb_audit_marks" (
    "user_id" UUID NOT NULL PRIMARY KEY REFERENCES "users" ("id") ON DELETE CASCADE,
    "seq" INT NOT NULL,
    "balance_after" INT NOT NULL,
    "transaction_id" UUID NOT NULL,
    "checkpoint_id" UUID NOT NULL
);
COMMENT ON TABLE "tokendb_audit_marks" IS
    'per user, the newest ledger row a clean incremental audit covered; the next one starts there';
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
DROP TABLE IF EXISTS "tokendb_audit_marks";
DROP TABLE IF EXISTS "tokendb_audit_checkpoints";
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
