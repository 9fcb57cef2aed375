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
