"""Emails hold no invisible characters (found by the adversarial review of issue 9).

Hand-written (no model changes). ``users_email_normalised`` trims with
``btrim()``, which removes ASCII spaces only, and ``users_email_shape``'s
``[:space:]`` does not match a no-break space under the ``C.UTF-8`` locale:
the application role could store ``"\u00a0ada@x.io"`` or ``"ada@x.io\u200b"``,
an address nobody can log in with or find (tokendb looks up
``normalize_email()``'s result, which strips or refuses these) and that is
not unique with ``ada@x.io`` either. ``users_email_printable`` refuses the
characters Python's ``email_validator`` calls unsafe that a text can hide:
controls (C0, C1), the Unicode space separators, line and paragraph
separators, soft hyphen, zero-width and bidirectional formatting characters
and the byte order mark. A CHECK is evaluated on every UPDATE of the row (a
charge's too): one regular-expression search of a short text.

Validating: a database that holds such an address (only the application
role's raw SQL could have written it) fails this migration, naming the
constraint; fix the address as the owner, then migrate again.
"""

from tortoise import BaseDBAsyncClient

from tokendb._migration_guard import ALREADY_APPLIED, apply_once

RUN_IN_TRANSACTION = True

# The characters a text can hide, as a PostgreSQL bracket expression (the ASCII
# spaces are users_email_shape's: one violation names one constraint).
HIDDEN = (
    "[[:cntrl:]\\u0080-\\u009f\\u00a0\\u00ad\\u034f\\u061c\\u115f\\u1160"
    "\\u1680\\u180e\\u2000-\\u200f\\u2028-\\u202f\\u205f-\\u206f\\u3000\\u3164"
    "\\ufeff\\uffa0\\ufff9-\\ufffb]"
)


async def upgrade(db: BaseDBAsyncClient) -> str:
    if not await apply_once(db, __file__):
        return ALREADY_APPLIED  # by a concurrent `aerich upgrade`, while this one waited
    return f"""
ALTER TABLE "users"
    ADD CONSTRAINT "users_email_printable" CHECK ("email" !~ '{HIDDEN}');
"""


async def downgrade(db: BaseDBAsyncClient) -> str:
    return """
ALTER TABLE "users" DROP CONSTRAINT IF EXISTS "users_email_printable";
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
