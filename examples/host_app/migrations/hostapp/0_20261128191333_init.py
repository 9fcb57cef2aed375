from tortoise import BaseDBAsyncClient

RUN_IN_TRANSACTION = True


async def upgrade(db: BaseDBAsyncClient) -> str:
    return """
        CREATE TABLE "projects" (
    "id" UUID NOT NULL PRIMARY KEY,
    "name" VARCHAR(100) NOT NULL,
    "created_at" TIMESTAMPTZ NOT NULL,
    "owner_id" UUID NOT NULL REFERENCES "users" ("id") ON DELETE RESTRICT
);
COMMENT ON TABLE "projects" IS 'A user''s project; a user with projects cannot be deleted (RESTRICT).';
CREATE TABLE "project_charges" (
    "id" UUID NOT NULL PRIMARY KEY,
    "tokens" INT NOT NULL,
    "project_id" UUID NOT NULL REFERENCES "projects" ("id") ON DELETE CASCADE,
    "transaction_id" UUID NOT NULL UNIQUE REFERENCES "token_transactions" ("id") ON DELETE RESTRICT
);
COMMENT ON TABLE "project_charges" IS 'A ledger row billed to a project, written in the same transaction as the charge.';"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
        DROP TABLE IF EXISTS "project_charges";
DROP TABLE IF EXISTS "projects";"""


MODELS_STATE = (
    "eJztmG1P2zAQx7+KlTcDiVVQKkDbNKkrRVSIFpWwSUyT5cbXNGtqh9hRqVC/+2wnaR5XoG"
    "IbnXjTNuc7+/I7+/xXH6wJF5IEQeMq5D/BkdYH9GAxMgP1ozK2hyz1mBvRFklGvvEOYi9h"
    "3EZChsRMNya+AGWiIJzQC6THmfZuo0hA+E6gJOwjIsaC5p6cpEaBHMIYl2gEiIIPEijaGX"
    "av7WGvY+829EqUO2opj7kvOWnEvLsIsOQuyAmEaurvP5TZYxTuQaSPwRSPPfBpgZlH9QTG"
    "juUiMLabm97pmfHUCY+ww/1oxjLvYCEnnK3co8ijDR2jx1xgEBKVYw4li3w/oZ6a4oyVQY"
    "YRrFKlmYHCmES+Loj1aRwxR9cBmZX0R+tzklrODeP+wMbXXRtjq1I/nUKJfmJyONO195jU"
    "oB6W8bwZEGO19AKd8/Zw5/Bo1yBQG8oNzaDBZS1NIJEkDjXQM8rmu8K5MyFhPefUv0RaJb"
    "oJ49SQQc42eYovBfQHkFozco99YK6cqMeD/f01jL+2hwaz8jKcuTqV8XHtJ0PNeEzzzvg6"
    "IWgemMgq5VM1Ir0Z1JMuRpZ40yS0kf7YRvrqBemA+YvkbK2Bb/cuVVtpX17p5WZC3PmGX9"
    "vu6pGmsS5K1p2jUp1Wk6BvPfsc6Ud0O+h3y6dm5WffWjonEkmOGZ9jQnNtILWm1ApV53NV"
    "Cfy8DpaPeck+9o+rvHnb0jfDeFrbtQyrKtwzHoLnsgtYGMQ9lQhhTl2/knwKjI4aNwK2sX"
    "Et082TWrN9GZL56jIt7Cn19vElrQfSW9oylEfEmc5JSPFvcDvqOnBBVIF/SQLPLobgE/MW"
    "VdYl8dMxk/1H0A1C3uQ5dAWo1aFZc1a2EEZc80p6bb1SPbU1ojLj+ri0xLmKPkVh+kBdJf"
    "5CPkcjz1dPSHKlCJPZ9tA89KQEhjyGlMxDQmWo0BAmSCyPiDD2eNU6tfnyC7wpz1fQwtcp"
    "T9OCa3pKj8l60FlACbY+itvXTixznN83D1rHrZPDo9aJcjGJrizHa8D3+nZJaaZH+3m7tx"
    "j1pjtKUHM95plgq5F/t0W8SrRrJF2Q/TWyqair+ZdlOzfto7queGoLyq7Tvu60T7vrhF1V"
    "r9Ru+GopBgxsrj6eqq5t/W0XZ9zGnf5oPaqH/SlqewNhuPwF7J+m6g=="
)
