from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return """
        CREATE TABLE IF NOT EXISTS "users" (
    "id" UUID NOT NULL PRIMARY KEY,
    "email" VARCHAR(255) NOT NULL UNIQUE,
    "password_hash" VARCHAR(255) NOT NULL,
    "name" VARCHAR(100) NOT NULL,
    "role" VARCHAR(5) NOT NULL,
    "token_balance" INT NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "updated_at" TIMESTAMPTZ NOT NULL
);
COMMENT ON COLUMN "users"."role" IS 'ADMIN: admin\nUSER: user';
CREATE TABLE IF NOT EXISTS "api_keys" (
    "id" UUID NOT NULL PRIMARY KEY,
    "key_hash" VARCHAR(255) NOT NULL UNIQUE,
    "key_prefix" VARCHAR(20) NOT NULL,
    "name" VARCHAR(100) NOT NULL,
    "permissions" JSONB NOT NULL,
    "is_active" BOOL NOT NULL,
    "last_used_at" TIMESTAMPTZ,
    "expires_at" TIMESTAMPTZ,
    "created_at" TIMESTAMPTZ NOT NULL,
    "user_id" UUID NOT NULL REFERENCES "users" ("id") ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS "chat_sessions" (
    "id" UUID NOT NULL PRIMARY KEY,
    "tokens_used" INT NOT NULL,
    "model" VARCHAR(50) NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "ended_at" TIMESTAMPTZ,
    "api_key_id" UUID NOT NULL REFERENCES "api_keys" ("id") ON DELETE RESTRICT,
    "user_id" UUID NOT NULL REFERENCES "users" ("id") ON DELETE CASCADE
);
CREATE TABLE IF NOT EXISTS "chat_messages" (
    "id" UUID NOT NULL PRIMARY KEY,
    "role" VARCHAR(9) NOT NULL,
    "content" TEXT NOT NULL,
    "tokens" INT NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "session_id" UUID NOT NULL REFERENCES "chat_sessions" ("id") ON DELETE CASCADE
);
COMMENT ON COLUMN "chat_messages"."role" IS 'USER: user\nASSISTANT: assistant\nSYSTEM: system';
CREATE TABLE IF NOT EXISTS "token_transactions" (
    "id" UUID NOT NULL PRIMARY KEY,
    "amount" INT NOT NULL,
    "type" VARCHAR(6) NOT NULL,
    "description" TEXT,
    "reference_id" UUID,
    "balance_after" INT NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "user_id" UUID NOT NULL REFERENCES "users" ("id") ON DELETE RESTRICT
);
COMMENT ON COLUMN "token_transactions"."type" IS 'TOPUP: topup\nUSAGE: usage\nREFUND: refund\nBONUS: bonus';
CREATE TABLE IF NOT EXISTS "aerich" (
    "id" SERIAL NOT NULL PRIMARY KEY,
    "version" VARCHAR(255) NOT NULL,
    "app" VARCHAR(100) NOT NULL,
    "content" JSONB NOT NULL
);"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
        """


MODELS_STATE = (
    "eJztXFFzmzgQ/isMT72ZXCZNk7T13NyMnTitr7XdsfFdr5cbRgbZ1gQERaKJp5f/fpIMBg"
    "Q4xjEJITwlXu2C+FZa9tsFfqrUuYbYnB62XfQJLtWW8lPFwIbsH3noQFGB68YGuISCqSWU"
    "gYv0a7gkQm1KqAcMyuQzYBHIRCYkhodcihzMpNi3LC50DKaI8DwS+Rh996FOnTmkC+ixgX"
    "/+ZWKETXgLSfjTvdZnCFpmYrrI5OcWcp0uXSGbTHoXl0KTn26qG47l2zjSdpd04eC1uu8j"
    "85Db8LE5xNADFJqxy+CzDK44FK1mzATU8+F6qmYkMOEM+BYHQ/1t5mODY6CE2CKTHGJ4oy"
    "Pz92CKMXVdHww1fdzVdF0tgKHhYI4/wpQD9vNuddwIGCFV+QnOP7ZHr96c/SKgcAide2JQ"
    "wKbeCUNAwcpUgB+hzXytLwBZpDE/XwAvG/O4jYQ8m3A5mIcwlQCsaoNb3YJ4Thfs5/Hp6Q"
    "ak/2yPBNhMS6DtsP2x2jiDYOh4NcZRT6LsenCGboviHFntB+lQEEEdbe3Hx/poG6iP8pE+"
    "koEWfwtAHOrXENzXR9ugy7Ry4RVjSXxd6NmIEDYxkob5j/FwkA2zZCahbSKDKv8pFiK0LN"
    "RjIXvqI4siTA75+Z4iWnOY+JFtQr5bccRf9dtfZWecfx525LDOD9CRHIOIzu7U6EfG6u84"
    "jgUBzrl/xu0kv0yZYVkOCQP840LfGQ4/J6Dv9DQJ8Em/02XbQviBKSEqxL2BJgFuAUJ1n0"
    "BTBzSN+QWDiyIbZoMu28r7ITA+DP/ZwgkBnlUJRRt8oPX63bHW7n9JOOKirXX5yLGQLiXp"
    "qzNpX6wPovzV0z4q/KfybTjoyltlrad9U/mcgE8dHTs3OjDjmITiUJTwNLx1ETvcDn5OWj"
    "ZerrKXDQ9y3HfwctJyD16uXF7BLtAcYmsZrMBn4vZgs2z0OgvCnl6MccZM9kk7q7uV72GX"
    "nMjPrjPJJYcqDe2l40E0x5/gUgDcY/MA2MhKQEJ2PQmO8zwxjaTRovTAzbr0EV9R7OJNaM"
    "FV0nHeHp+3L7qqgHgKjOsb4Jl6DtbGAlCdwLzcvBOYX34aQQuIK8nHm/ElOl4dqkawCxid"
    "YycGXwLY9JB9bMsSgMFcXBI/Nz9THLM+w4wNq1nVt/j4wcYSnPCkvVJt6nAvpA7nMY6WXb"
    "joYt9OBcoE9qFtlYsY6mTcHbUUHuqucHs87rEb90BrKYBFGX5Z9AqP/x5r3X5LIUtCoa1u"
    "l5okSh7vtyh4vM8td7yXix3sXBTijHxQg7c0JxeMTKrsjb1k+N2v2uYyxjrT+zwcfAjV5d"
    "pGEnKxjzNuXz2cA3hkIOGNcGnFpDJTbXH3+PX49cnbk3dvzk7eMRUx0bXk7QaXpKsUDavJ"
    "h7q+rCZIAwsSm6RVw202cxsS5ccPpTf1TLcPJJaTXF5FiU7puXvogLzcPeag+3L3OAtrcv"
    "f65+6rHEQU9AtnLmurx0tfjp5J7mI7LEJkc6JsRNcGtUi9k9TmdJtm7ml+L/c01cptUsOX"
    "mBqySLuTz+N2TSOryo2s4Am+gsl/0qpJ/qVg2fSJmj7RkzOoe/tEGWFgH7BGDw7XFNhk8E"
    "tgO2LxeNQ717ZrwsW7Ng/sv8V6RTVBvdz+m8b/ah7ABBg0j8inlA42snkh02mk31D6F0Lp"
    "ge34WZ2fXDYfGTR9iAwuL9BIobldezO0rTKrV7Xhl8kXtikc13ev8GTc/tDl3U4WrK7wqH"
    "s5GVy0FA+yDWJe4c5wMBm3lKmDfbJLm/Nsi1KAzECiSsCZXAiIX0nKRfmtTslsJ+88IxpY"
    "RreTLQjoQbbmC1IL2e4Bcf75eKAAW5sCi0cSHcxoFrHIDeIpuyaWNz3lQlDXt3DYVECaCs"
    "iTE/W8Csg2LL1U9ilwz2KcoUM2sEx+UQ2xfCHEEtoAFWpqrg2aN623edPaBYTcOGw/F32p"
    "PWVYZbpZJcSbV67LfeX6eT0Zvs5kihRP2hf93qClANNGmBdPwifFdymObLPC89d3anWvSs"
    "ABMSxAJVN2j0cl2Roqa7U3TPLRAkuNmaRr7uj1pGXj9ap4PeO5lHXDL8XB7uuhxr9A9YAe"
    "au2a1snI2bztWQQuuYX7ALSyWsh1gazUEkkbeshYqJlfplsNHWz+Ml2kVJk6SW76l1kmyc"
    "j5gvtldRn7XjK+/HLID+hlv0WTzx9jJjWkkKVQdL6rCiAcqNcQ3VIIeu5rwvnfQ8t/TfgR"
    "voX2NL2RvX31rEBSuf/72d3/+Gt8FA=="
)
