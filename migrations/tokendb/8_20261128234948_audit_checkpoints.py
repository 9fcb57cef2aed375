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
